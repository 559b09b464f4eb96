"""The command's entry point: `enqueue-hydra` takes a fast path, the rest goes to click.

Imports nothing beyond `sys` until it knows the command, so that Hydra's RunCommand pays for
little more than the interpreter's start (see bridge/fastenqueue.py).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the command line with `argv` (default: sys.argv[1:])."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["enqueue-hydra"]:
        from bridge.fastenqueue import enqueue_hydra

        code = enqueue_hydra(args[1:])
        if code is not None:
            sys.exit(code)
    from bridge.cli import main as cli_main

    cli_main(args)

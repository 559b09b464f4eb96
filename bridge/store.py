"""Queries of the local Nix store, run as subprocesses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.process import run_command
from bridge.storepath import is_store_path

QUERY_TIMEOUT_SECONDS = 120.0
# The outputs list at the start of an ATerm .drv file: Derive([("out","/nix/store/…","",""),…
_DRV_OUTPUTS_RE = re.compile(r'Derive\(\[((?:\("[^"]*","[^"]*","[^"]*","[^"]*"\),?)*)\]')
_DRV_OUTPUT_RE = re.compile(r'\("[^"]*","([^"]*)","[^"]*","[^"]*"\)')
MAX_DRV_READ = 1 << 20


def outputs_from_drv_file(drv_path: str) -> list[str] | None:
    """Output paths written in an input-addressed .drv file; None when Nix must be asked."""
    try:
        with Path(drv_path).open("rb") as handle:
            head = handle.read(MAX_DRV_READ).decode("utf-8", errors="replace")
    except OSError:
        return None
    found = _DRV_OUTPUTS_RE.match(head)
    if found is None:
        return None
    paths = _DRV_OUTPUT_RE.findall(found.group(1))
    # Content-addressed outputs have an empty path until built: ask Nix for those.
    if not paths or not all(is_store_path(p) for p in paths):
        return None
    return paths


class StoreQueryError(Exception):
    """A Nix store query failed to run."""


@dataclass(frozen=True)
class NixStore:
    """The local Nix store, reached through `nix-store` (no substitution, stable interface)."""

    nix_store: str = "nix-store"
    timeout: float = QUERY_TIMEOUT_SECONDS

    def _run(self, args: list[str]) -> str:
        result = run_command([self.nix_store, *args], timeout=self.timeout)
        if not result.ok:
            detail = result.spawn_error or result.output.strip().splitlines()[-1:] or ["failed"]
            raise StoreQueryError(f"nix-store {args[0]} failed: {detail}")
        return result.output

    def resolve_outputs(self, drv_path: str) -> list[str]:
        """Output paths of a derivation (for hook events whose OUT_PATHS was empty)."""
        from_file = outputs_from_drv_file(drv_path)
        if from_file is not None:
            return from_file
        output = self._run(["--query", "--outputs", drv_path])
        # Output mixes stdout and stderr: keep only the lines that are store paths.
        paths = [line.strip() for line in output.splitlines() if is_store_path(line.strip())]
        if not paths:
            raise StoreQueryError(f"nix-store --query --outputs gave no store paths for {drv_path}")
        return paths

    def invalid_paths(self, paths: Sequence[str]) -> set[str]:
        """Paths that are not (or no longer) valid in the local store."""
        if not paths:
            return set()
        output = self._run(["--check-validity", "--print-invalid", *paths])
        return {line.strip() for line in output.splitlines() if line.strip() in paths}

    def nar_sizes(self, paths: Sequence[str]) -> dict[str, int]:
        """NAR size in bytes of each valid path (0 where Nix does not say)."""
        if not paths:
            return {}
        output = self._run(["--query", "--size", *paths])
        sizes = [line.strip() for line in output.splitlines() if line.strip().isdigit()]
        if len(sizes) != len(paths):
            return dict.fromkeys(paths, 0)
        return {path: int(size) for path, size in zip(paths, sizes, strict=True)}

"""Real Nix builds for tests: unique trivial derivations built offline."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from bridge.nixbuild import nix_build_command

OFFLINE = "substituters =\nbuilders =\n"


@functools.cache
def nix_version() -> tuple[int, ...]:
    """The version of the nix-build on PATH, e.g. (2, 8, 0) or (2, 26, 3)."""
    out = subprocess.run(
        ["nix-build", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RuntimeError(f"cannot read the Nix version from {out!r}")
    return tuple(int(part or 0) for part in match.groups())


def hook_gets_out_paths() -> bool:
    """Whether this Nix fills the post-build-hook's OUT_PATHS (only 2.8.0 leaves it empty)."""
    return nix_version() != (2, 8, 0)


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with NIX_CONFIG extended so no command waits on the network."""
    env = dict(os.environ)
    env["NIX_CONFIG"] = (env.get("NIX_CONFIG", "") + "\n" + OFFLINE).lstrip("\n")
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Built:
    """A built derivation and its output path."""

    name: str
    drv: str
    out: str

    @property
    def hash(self) -> str:
        """The store hash part, which names the narinfo file."""
        return Path(self.out).name.split("-", 1)[0]


def nix_expression(names: list[str], *, depends_on_first: bool = False) -> str:
    """A Nix file with one trivial derivation per name (optionally all referring to the first)."""
    lines = [
        "let",
        "  mk = name: script: derivation {",
        "    inherit name;",
        "    system = builtins.currentSystem;",
        '    builder = "/bin/sh";',
        '    args = [ "-c" script ];',
        "  };",
        "in rec {",
    ]
    for index, name in enumerate(names):
        attr = f"d{index}"
        if depends_on_first and index > 0:
            script = f"echo {name} ${{d0}} > $out"
        else:
            script = f"echo {name} > $out"
        lines.append(f'  {attr} = mk "{name}" "{script}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nix_build(
    expr: Path, hook: Path | None, env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    args = [str(expr), "--no-out-link"]
    if hook is not None:
        args += ["--option", "post-build-hook", str(hook)]
    args = nix_build_command(args, with_hook=hook is not None)
    done = subprocess.run(
        args, capture_output=True, text=True, env=offline_env(env), check=False, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"nix-build failed: {done.stderr}")
    return done


def build(
    directory: Path,
    count: int = 1,
    *,
    prefix: str = "hcb-test",
    hook: Path | None = None,
    depends_on_first: bool = False,
    env: dict[str, str] | None = None,
) -> list[Built]:
    """Build `count` new derivations with real nix-build; optionally with a post-build-hook."""
    nonce = uuid.uuid4().hex[:12]
    names = [f"{prefix}-{nonce}-{i}" for i in range(count)]
    expr = directory / f"{prefix}-{nonce}.nix"
    expr.write_text(nix_expression(names, depends_on_first=depends_on_first))
    outs = _nix_build(expr, hook, env).stdout.split()
    result = []
    for name, out in zip(names, outs, strict=True):
        drv = subprocess.run(
            ["nix-store", "--query", "--deriver", out], capture_output=True, text=True, check=True
        ).stdout.strip()
        result.append(Built(name, drv, out))
    return result


@dataclass(frozen=True)
class MultiOutput:
    """A built derivation with two outputs, `out` and `dev`."""

    drv: str
    out: str
    dev: str


def build_multi_output(
    directory: Path, *, hook: Path | None = None, env: dict[str, str] | None = None
) -> MultiOutput:
    """Build one new derivation with outputs out and dev (optionally with a post-build-hook)."""
    name = f"hcb-multi-{uuid.uuid4().hex[:12]}"
    expr = directory / f"{name}.nix"
    expr.write_text(
        "derivation {\n"
        f'  name = "{name}";\n'
        "  system = builtins.currentSystem;\n"
        '  builder = "/bin/sh";\n'
        '  outputs = [ "out" "dev" ];\n'
        '  args = [ "-c" "echo out > $out; echo dev > $dev" ];\n'
        "}\n"
    )
    _nix_build(expr, hook, env)
    query = subprocess.run(
        ["nix-instantiate", str(expr)],
        capture_output=True,
        text=True,
        check=True,
        env=offline_env(env),
        timeout=120,
    )
    drv = query.stdout.strip()
    outputs = subprocess.run(
        ["nix-store", "--query", "--outputs", drv], capture_output=True, text=True, check=True
    ).stdout.split()
    dev = next(p for p in outputs if p.endswith("-dev"))
    out = next(p for p in outputs if not p.endswith("-dev"))
    return MultiOutput(drv, out, dev)


def narinfo(cache_dir: Path, built: Built) -> Path:
    """Where the narinfo of a built path lands in a file:// binary cache."""
    return cache_dir / f"{built.hash}.narinfo"


def hydra_payload(
    build_id: int,
    built: Built,
    *,
    project: str = "proj",
    jobset: str = "main",
    job: str = "pkg.x86_64-linux",
    status: int | None = 0,
    extra_outputs: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    """A buildFinished payload with every field Hydra sends (REFERENCE.md §1)."""
    return {
        "event": "buildFinished",
        "build": build_id,
        "finished": True,
        "timestamp": 1_700_000_000,
        "startTime": 1_700_000_010,
        "stopTime": 1_700_000_020,
        "project": project,
        "jobset": jobset,
        "job": job,
        "drvPath": built.drv,
        "buildStatus": status,
        "nixName": built.name,
        "system": "x86_64-linux",
        "homepage": "https://example.org",
        "description": "a test package",
        "license": "MIT",
        "outputs": [{"name": "out", "path": built.out}, *(extra_outputs or [])],
        "products": [
            {
                "productNr": 1,
                "type": "nix-build",
                "subtype": "",
                "fileSize": None,
                "sha256hash": None,
                "path": built.out,
                "name": built.name,
                "defaultPath": "",
            }
        ],
        "metrics": [{"name": "closure-size", "unit": "bytes", "value": 120}],
    }

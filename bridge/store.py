"""Queries of the local Nix store, run as subprocesses."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.process import run_command
from bridge.safeopen import TRANSIENT_ERRNOS, NotRegularFile, read_regular_file
from bridge.storepath import is_store_path

QUERY_TIMEOUT_SECONDS = 120.0
# The outputs list at the start of an ATerm .drv file: Derive([("out","/nix/store/…","",""),…
_DRV_OUTPUTS_RE = re.compile(r'Derive\(\[((?:\("[^"]*","[^"]*","[^"]*","[^"]*"\),?)*)\]')
_DRV_OUTPUT_RE = re.compile(r'\("[^"]*","([^"]*)","[^"]*","[^"]*"\)')
MAX_DRV_READ = 1 << 20
PATH_INFO_CHUNK = 50


class StoreQueryError(Exception):
    """A Nix store query failed to run."""


def outputs_from_drv_file(drv_path: str) -> list[str] | None:
    """Output paths written in an input-addressed .drv file; None when Nix must be asked.

    The file is read without following a link or waiting on a FIFO (a store path named
    `*.drv` may be either): such a file raises StoreQueryError, as Nix could block on it
    too. Transient errors (out of descriptors, EIO) are raised as OSError for the caller
    to try again later.
    """
    try:
        head = read_regular_file(drv_path, MAX_DRV_READ, head_only=True).decode(
            "utf-8", errors="replace"
        )
    except NotRegularFile:
        raise StoreQueryError(f"{drv_path} is not a regular file (not a derivation)") from None
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise
        return None  # not in this store's directory, not readable: Nix may know
    found = _DRV_OUTPUTS_RE.match(head)
    if found is None:
        return None
    paths = _DRV_OUTPUT_RE.findall(found.group(1))
    # Content-addressed outputs have an empty path until built: ask Nix for those.
    if not paths or not all(is_store_path(p) for p in paths):
        return None
    return paths


@dataclass(frozen=True)
class PathInfo:
    """What `nix path-info --json` says about one valid store path."""

    path: str
    nar_size: int


def _path_info_entry(path: str, entry: Any) -> PathInfo | None:
    # Nix 2.8 marks an invalid path with "valid": false; 2.19 and later give null.
    if not isinstance(entry, dict) or entry.get("valid") is False:
        return None
    size = entry.get("narSize")
    return PathInfo(path, size if isinstance(size, int) and size >= 0 else 0)


def parse_path_info(text: str) -> dict[str, PathInfo | None]:
    """Read `nix path-info --json` of any Nix version; None for a path that is not valid.

    Nix up to 2.18 prints a list of objects that carry "path"; from 2.19 on an object keyed
    by path (null for an invalid path).
    """
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise StoreQueryError(f"nix path-info --json printed no JSON: {exc}") from None
    if isinstance(document, list):
        pairs = [(e.get("path"), e) for e in document if isinstance(e, dict)]
    elif isinstance(document, dict):
        pairs = list(document.items())
    else:
        raise StoreQueryError("nix path-info --json printed neither a list nor an object")
    return {
        path: _path_info_entry(path, entry)
        for path, entry in pairs
        if isinstance(path, str) and is_store_path(path)
    }


@dataclass(frozen=True)
class NixStore:
    """The local Nix store, reached through `nix-store` (no substitution, stable interface)."""

    nix_store: str = "nix-store"
    nix: str = "nix"
    timeout: float = QUERY_TIMEOUT_SECONDS

    def _run(self, args: list[str]) -> str:
        return self._output([self.nix_store, *args], f"nix-store {args[0]}")

    def _output(self, command: list[str], what: str) -> str:
        """The command's output. OSError when it could not start for want of descriptors or
        memory (the machine, not the query, is at fault); StoreQueryError when it failed."""
        result = run_command(command, timeout=self.timeout)
        if result.ok:
            return result.output
        if result.spawn_errno in TRANSIENT_ERRNOS:
            raise OSError(result.spawn_errno, result.spawn_error or "cannot start")
        detail = result.spawn_error or result.output.strip().splitlines()[-1:] or ["failed"]
        raise StoreQueryError(f"{what} failed: {detail}")

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

    def missing_paths(self, paths: Sequence[str]) -> set[str]:
        """Paths not on disk in the store (garbage-collected): invalid without asking Nix."""
        return {path for path in paths if not os.path.lexists(path)}

    def invalid_paths(self, paths: Sequence[str]) -> set[str]:
        """Paths that are not (or no longer) valid in the local store."""
        if not paths:
            return set()
        output = self._run(["--check-validity", "--print-invalid", *paths])
        return {line.strip() for line in output.splitlines() if line.strip() in paths}

    def path_info(self, paths: Sequence[str]) -> dict[str, PathInfo | None]:
        """`nix path-info --json` of paths (None for one that is not valid), never substituting."""
        found: dict[str, PathInfo | None] = {}
        # A chunk's JSON (references included) must fit in the captured output's tail.
        for start in range(0, len(paths), PATH_INFO_CHUNK):
            chunk = paths[start : start + PATH_INFO_CHUNK]
            command = [self.nix, "--extra-experimental-features", "nix-command", "path-info"]
            command += ["--json", "--option", "substituters", "", "--", *chunk]
            output = self._output(command, "nix path-info")
            # Output mixes stdout and stderr: the JSON is the one line that starts as JSON.
            lines = [ln for ln in output.splitlines() if ln.startswith(("[", "{"))]
            if not lines:
                raise StoreQueryError("nix path-info --json printed no JSON")
            found.update(parse_path_info(lines[-1]))
        return found

    def nar_sizes(self, paths: Sequence[str]) -> dict[str, int]:
        """NAR size in bytes of each valid path (0 where Nix does not say).

        `nix-store --query --size` fails for the whole list when one path is gone; then
        `nix path-info` gives the sizes of the others.
        """
        if not paths:
            return {}
        try:
            output = self._run(["--query", "--size", *paths])
        except StoreQueryError:
            infos = self.path_info(paths)
            return {path: info.nar_size for path, info in infos.items() if info is not None}
        sizes = [line.strip() for line in output.splitlines() if line.strip().isdigit()]
        if len(sizes) != len(paths):
            return dict.fromkeys(paths, 0)
        return {path: int(size) for path, size in zip(paths, sizes, strict=True)}

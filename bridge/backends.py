"""Push backends: `cachix push` and `nix copy --to URI`, each run as a killable subprocess."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from bridge.config import CacheConfig
from bridge.process import CommandResult, run_command
from bridge.safeopen import TRANSIENT_ERRNOS
from bridge.secrets import SecretError, read_secret, redact, resolve_secret_path
from exporter.vocabulary import BackendKind, FailureReason


@dataclass(frozen=True)
class PushOutcome:
    """The result of one push invocation for a batch of paths."""

    ok: bool
    duration: float
    reason: FailureReason | None = None
    error: str | None = None
    cancelled: bool = False
    # The backend could not even start for want of descriptors, processes or memory: the
    # machine's fault, not the paths', so no attempt is charged.
    exhausted: bool = False
    # Paths the tool said it skipped although it exited 0 (cachix: not valid in the store).
    skipped: frozenset[str] = frozenset()


class Backend(Protocol):
    """Something that pushes the closures of store paths to one cache."""

    name: str

    def push(self, paths: Sequence[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        """Push paths; never raise for an ordinary failure."""


def _last_lines(text: str, count: int = 5) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-1000:]


def outcome_from(result: CommandResult, program: str, secrets: list[str]) -> PushOutcome:
    """Translate a finished command into a push outcome with a redacted error."""
    if result.ok:
        return PushOutcome(ok=True, duration=result.duration)
    # Redact before shortening: a cut through a secret would hide it from redaction.
    tail = _last_lines(redact(result.output, secrets))
    if result.spawn_error is not None:
        return PushOutcome(
            False,
            result.duration,
            FailureReason.SPAWN_ERROR,
            redact(result.spawn_error, secrets),
            exhausted=result.spawn_errno in TRANSIENT_ERRNOS,
        )
    if result.cancelled:
        return PushOutcome(
            False, result.duration, FailureReason.TIMEOUT, "cancelled at shutdown", cancelled=True
        )
    if result.timed_out:
        message = f"{program} timed out after {result.duration:.0f}s; process group killed"
        return PushOutcome(
            False, result.duration, FailureReason.TIMEOUT, f"{message}: {tail}".rstrip(": ")
        )
    if result.signal_name is not None:
        return PushOutcome(
            False,
            result.duration,
            FailureReason.SIGNAL,
            f"{program} killed by {result.signal_name}: {tail}".rstrip(": "),
        )
    return PushOutcome(
        False,
        result.duration,
        FailureReason.EXIT_STATUS,
        f"{program} exited {result.returncode}: {tail}".rstrip(": "),
    )


class CachixBackend:
    """`cachix [-c CONFIG] [--hostname URI] push [extra_args] CACHE` with paths on stdin."""

    def __init__(self, cache: CacheConfig, base_env: dict[str, str] | None = None) -> None:
        self.name = cache.name
        self.cache = cache
        self.base_env = base_env

    def command(self) -> list[str]:
        """The argument list (no paths; they go to stdin)."""
        args = [self.cache.executable or BACKEND_KINDS[BackendKind.CACHIX].executable]
        if self.cache.cachix_config is not None:
            args += ["-c", str(resolve_secret_path(self.cache.cachix_config))]
        if self.cache.hostname:
            args += ["--hostname", self.cache.hostname]
        return [*args, "push", *self.cache.extra_args, self.cache.name]

    def push(self, paths: Sequence[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        """Push the closures of paths with the cachix CLI."""
        env = dict(os.environ if self.base_env is None else self.base_env)
        secrets: list[str] = []
        try:
            if self.cache.auth_token_file is not None:
                env["CACHIX_AUTH_TOKEN"] = read_secret(self.cache.auth_token_file)
                secrets.append(env["CACHIX_AUTH_TOKEN"])
            if self.cache.signing_key_file is not None:
                env["CACHIX_SIGNING_KEY"] = read_secret(self.cache.signing_key_file)
                secrets.append(env["CACHIX_SIGNING_KEY"])
            command = self.command()
        except SecretError as exc:
            return PushOutcome(False, 0.0, FailureReason.SECRET, str(exc))
        stdin = "".join(f"{path}\n" for path in paths).encode()
        result = run_command(command, timeout=timeout, stdin_data=stdin, env=env, cancel=cancel)
        outcome = outcome_from(result, "cachix push", secrets)
        if outcome.ok:
            skipped = cachix_skipped(result.output, paths)
            if skipped:
                return dataclasses.replace(outcome, skipped=skipped)
        return outcome


# cachix (Command/Push.hs, CNix.hs validateStorePath; v1.7 to v1.11.1) warns once for each
# path that is not valid in the local store, skips it and still exits 0.
_CACHIX_SKIPPED = re.compile(r"^Warning: (/\S+) is not valid, skipping$", re.MULTILINE)


def cachix_skipped(output: str, paths: Sequence[str]) -> frozenset[str]:
    """The paths of this push that cachix's output says it skipped."""
    wanted = set(paths)
    return frozenset(p for p in _CACHIX_SKIPPED.findall(output) if p in wanted)


class NixCopyBackend:
    """`nix copy --to URI PATHS…` to any Nix store URI (file://, s3://, ssh-ng://, …)."""

    def __init__(self, cache: CacheConfig, base_env: dict[str, str] | None = None) -> None:
        self.name = cache.name
        self.cache = cache
        self.base_env = base_env

    def destination(self) -> str:
        """The store URI, with `secret-key=` added when a signing key file is configured."""
        uri = self.cache.uri or ""
        if self.cache.signing_key_file is not None:
            key = quote(str(resolve_secret_path(self.cache.signing_key_file)), safe="/")
            uri += ("&" if "?" in uri else "?") + f"secret-key={key}"
        return uri

    def command(self, paths: Sequence[str]) -> list[str]:
        """The argument list, paths included."""
        return [
            self.cache.executable or BACKEND_KINDS[BackendKind.NIX_COPY].executable,
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            self.destination(),
            *self.cache.extra_args,
            "--",
            *paths,
        ]

    def push(self, paths: Sequence[str], timeout: float, cancel: threading.Event) -> PushOutcome:
        """Copy the closures of paths to the destination store."""
        try:
            command = self.command(paths)
        except SecretError as exc:
            return PushOutcome(False, 0.0, FailureReason.SECRET, str(exc))
        result = run_command(command, timeout=timeout, env=self.base_env, cancel=cancel)
        return outcome_from(result, "nix copy", [])


@dataclass(frozen=True)
class BackendKindSpec:
    """What the rest of the bridge needs to know of one kind of backend."""

    make: Callable[[CacheConfig], Backend]
    executable: str
    """The program run when the cache sets no `executable`."""
    skips_invalid: bool
    """The tool skips a path that is not valid in the store and still exits 0, so a
    successful push must be checked for paths that were not uploaded."""


# The one place a new kind of backend is added (with its BackendKind member and the
# checks of its own settings in config.py).
BACKEND_KINDS: Mapping[BackendKind, BackendKindSpec] = {
    BackendKind.CACHIX: BackendKindSpec(CachixBackend, "cachix", skips_invalid=True),
    BackendKind.NIX_COPY: BackendKindSpec(NixCopyBackend, "nix", skips_invalid=False),
}


def make_backend(cache: CacheConfig) -> Backend:
    """The backend for a configured cache."""
    return BACKEND_KINDS[cache.backend].make(cache)

"""Unit tests for bridge.config: TOML loading, validation messages, defaults, job patterns."""

from __future__ import annotations

import dataclasses
import datetime
import math
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bridge.config import (
    CONFIG_ENV,
    CacheConfig,
    Config,
    ConfigError,
    LogSource,
    MetricsSettings,
    PushSettings,
    SpoolSettings,
    default_config,
    default_state_dir,
    load_config,
    parse_config,
)
from bridge.matching import JobPattern, Rule
from bridge.preflight import check_host
from bridge.render import render_config
from exporter.vocabulary import Source

EXAMPLE = """\
state_dir = "/var/lib/hydra-cachix-bridge"
spool_dir = "/var/spool/hydra-cachix-bridge"
[push]
workers = 4
batch_size = 32
timeout_seconds = 1800
max_attempts = 8
backoff_initial_seconds = 5
backoff_max_seconds = 900
[caches.mycache]
backend = "cachix"
cachix_config = "/etc/cachix/cachix.dhall"
auth_token_file = "/run/credentials/x/token"
signing_key_file = "/run/credentials/x/key"
extra_args = ["--compression-method", "zstd"]
[caches.mirror]
backend = "nix-copy"
uri = "file:///var/cache/nix-mirror"
[[rules]]
jobs = ["home:mybuild:*"]
caches = ["mycache"]
build_statuses = [0]
exclude = ["*-spec.json"]
[[rules]]
sources = ["hook"]
caches = ["mirror"]
"""

MINIMAL_CACHE = '[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/c"\n'

Writer = Callable[..., Path]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The issue's example config with every absolute path moved under tmp_path."""
    text = EXAMPLE
    for old in (
        "/var/lib/hydra-cachix-bridge",
        "/var/spool/hydra-cachix-bridge",
        "/etc/cachix/cachix.dhall",
        "/run/credentials/x/token",
        "/run/credentials/x/key",
        "/var/cache/nix-mirror",
    ):
        text = text.replace(old, f"{tmp_path}{old}")
    path = tmp_path / "etc" / "bridge.toml"
    path.parent.mkdir()
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert problems, "ConfigError without problems"
    assert str(info.value) == "\n".join(problems)
    return problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- defaults


class TestDefaults:
    def test_no_file_and_no_env_gives_embedded_defaults(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(CONFIG_ENV, raising=False)
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
        config = load_config()
        state = tmp_path / "xdg" / "hydra-cachix-bridge"
        assert config.state_dir == state
        assert config.spool_dir == state / "spool"
        assert config.database_path == state / "queue.sqlite3"
        assert list(config.caches) == ["local"]
        local = config.caches["local"]
        assert local.backend == "nix-copy"
        assert local.uri == f"file://{state / 'binary-cache'}"
        assert config.rules == (Rule(caches=("local",)),)
        assert config.rules[0].sources == tuple(Source)
        assert config.rules[0].build_statuses == (0,)
        assert config.push == PushSettings()
        assert config.source_file is None

    def test_empty_env_var_means_defaults(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(CONFIG_ENV, "")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
        assert load_config().source_file is None

    def test_default_state_dir_without_xdg(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert default_state_dir() == tmp_path / ".local" / "state" / "hydra-cachix-bridge"

    def test_default_config_with_relative_state_dir_is_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        config = default_config(Path("rel"))
        assert config.state_dir == tmp_path / "rel"
        assert config.state_dir.is_absolute()

    def test_env_var_names_the_file(self, example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(example))
        config = load_config()
        assert config.source_file == example
        assert set(config.caches) == {"mycache", "mirror"}

    def test_explicit_path_wins_over_env(
        self, example: Path, write_config: Writer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(example))
        other = write_config(MINIMAL_CACHE)
        assert set(load_config(other).caches) == {"c"}

    def test_env_var_pointing_to_missing_file_is_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        missing = tmp_path / "nope.toml"
        monkeypatch.setenv(CONFIG_ENV, str(missing))
        with pytest.raises(ConfigError) as info:
            load_config()
        assert info.value.problems == [f"{missing}: file not found"]

    def test_file_with_only_a_cache_uses_default_settings(self, write_config: Writer) -> None:
        config = load_config(write_config(MINIMAL_CACHE))
        assert config.push == PushSettings()
        assert config.spool == SpoolSettings()
        assert config.metrics == MetricsSettings()
        assert config.log_level == "info"
        assert config.retention_days == 14.0
        assert config.log_poll_seconds == 1.0
        assert config.log_sources == ()
        # No [[rules]]: one rule sending every source to every cache.
        assert config.rules == (Rule(caches=("c",)),)


# --------------------------------------------------------------------------- the example


class TestExampleConfig:
    def test_top_level(self, example: Path, tmp_path: Path) -> None:
        config = load_config(example)
        assert isinstance(config, Config)
        assert config.state_dir == tmp_path / "var/lib/hydra-cachix-bridge"
        assert config.spool_dir == tmp_path / "var/spool/hydra-cachix-bridge"
        assert config.database_path == config.state_dir / "queue.sqlite3"
        assert config.source_file == example

    def test_push(self, example: Path) -> None:
        push = load_config(example).push
        assert push == PushSettings(
            workers=4,
            batch_size=32,
            timeout_seconds=1800.0,
            max_attempts=8,
            backoff_initial_seconds=5.0,
            backoff_max_seconds=900.0,
        )
        assert isinstance(push.workers, int)
        assert isinstance(push.timeout_seconds, float)
        assert isinstance(push.backoff_initial_seconds, float)

    def test_caches(self, example: Path, tmp_path: Path) -> None:
        caches = load_config(example).caches
        assert list(caches) == ["mycache", "mirror"]
        assert caches["mycache"] == CacheConfig(
            name="mycache",
            backend="cachix",
            cachix_config=tmp_path / "etc/cachix/cachix.dhall",
            auth_token_file=tmp_path / "run/credentials/x/token",
            signing_key_file=tmp_path / "run/credentials/x/key",
            extra_args=("--compression-method", "zstd"),
        )
        assert caches["mirror"] == CacheConfig(
            name="mirror", backend="nix-copy", uri=f"file://{tmp_path}/var/cache/nix-mirror"
        )

    def test_rules(self, example: Path) -> None:
        rules = load_config(example).rules
        assert rules == (
            Rule(
                caches=("mycache",),
                jobs=(JobPattern("home", "mybuild", "*"),),
                sources=tuple(Source),
                build_statuses=(0,),
                exclude=("*-spec.json",),
            ),
            Rule(caches=("mirror",), sources=("hook",)),
        )
        assert all(isinstance(r.caches, tuple) for r in rules)

    def test_everything_is_frozen(self, example: Path) -> None:
        config = load_config(example)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.state_dir = Path("/")  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.push.workers = 1  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.caches["mirror"].uri = "file:///x"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.rules[0].caches = ()  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.rules[0].jobs[0].project = "x"  # type: ignore[misc]
        with pytest.raises(TypeError):
            config.caches["new"] = config.caches["mirror"]  # type: ignore[index]
        with pytest.raises(TypeError):
            del config.caches["mirror"]  # type: ignore[attr-defined]
        assert isinstance(config.rules, tuple)
        assert isinstance(config.caches["mycache"].extra_args, tuple)
        assert isinstance(config.rules[0].build_statuses, tuple)
        assert isinstance(config.rules[0].exclude, tuple)

    def test_config_is_hashable_parts(self, example: Path) -> None:
        config = load_config(example)
        # Frozen dataclasses with tuple fields hash; this lets callers use them as keys.
        assert len({config.push, config.spool, config.metrics, *config.rules}) == 5

    def test_every_section_and_option(self, write_config: Writer, tmp_path: Path) -> None:
        path = write_config(
            'spool_dir = "spool-here"\n'
            'log_level = "debug"\n'
            "retention_days = 2.5\n"
            "log_poll_seconds = 0.5\n"
            "[push]\nshutdown_grace_seconds = 3\n"
            "[spool]\nmax_event_bytes = 4096\nrescan_seconds = 0.5\ngroup_writable = true\n"
            '[metrics]\nenabled = false\nlisten_address = "0.0.0.0"\nport = 9300\n'
            "per_jobset = true\nper_jobset_limit = 50\n"
            '[caches.c]\nbackend = "cachix"\nhostname = "https://cachix.example"\n'
            'executable = "/opt/cachix"\nmax_parallel = 2\n'
            '[[log_sources]]\npath = "logs/hook.log"\n'
        )
        config = load_config(path)
        assert config.log_level == "debug"
        assert config.retention_days == 2.5
        assert config.log_poll_seconds == 0.5
        assert config.push.shutdown_grace_seconds == 3.0
        assert config.spool == SpoolSettings(4096, 0.5, True)
        assert config.metrics == MetricsSettings(
            enabled=False, listen_address="0.0.0.0", port=9300, per_jobset=True, per_jobset_limit=50
        )
        assert config.caches["c"].hostname == "https://cachix.example"
        assert config.caches["c"].executable == "/opt/cachix"
        assert config.caches["c"].max_parallel == 2
        assert config.log_sources == (LogSource(tmp_path / "logs" / "hook.log"),)
        assert config.spool_dir == tmp_path / "spool-here"


# --------------------------------------------------------------------------- relative paths


class TestRelativePaths:
    def test_relative_dirs_resolve_against_config_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        confdir = tmp_path / "conf"
        confdir.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        path = confdir / "bridge.toml"
        path.write_text(
            'state_dir = "state"\nspool_dir = "../spool"\n'
            + MINIMAL_CACHE
            + '[[log_sources]]\npath = "log/a.log"\n'
        )
        config = load_config(path)
        assert config.state_dir == confdir / "state"
        assert config.spool_dir == confdir / ".." / "spool"
        assert config.log_sources[0].path == confdir / "log" / "a.log"
        assert config.state_dir.is_absolute() and config.spool_dir.is_absolute()

    def test_relative_config_path_itself(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "conf").mkdir()
        (tmp_path / "conf" / "b.toml").write_text('state_dir = "s"\n' + MINIMAL_CACHE)
        monkeypatch.chdir(tmp_path)
        config = load_config("conf/b.toml")
        assert config.state_dir == tmp_path / "conf" / "s"

    def test_spool_dir_defaults_under_state_dir(self, write_config: Writer, tmp_path: Path) -> None:
        config = load_config(write_config(MINIMAL_CACHE))
        assert config.spool_dir == tmp_path / "state" / "spool"

    def test_relative_tls_files_resolve_against_config_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        confdir = tmp_path / "conf"
        confdir.mkdir()
        monkeypatch.chdir(tmp_path)
        path = confdir / "bridge.toml"
        path.write_text(
            f'state_dir = "{tmp_path}/s"\n'
            '[metrics]\ntls_cert_file = "tls/cert.pem"\ntls_key_file = "tls/key.pem"\n'
            + MINIMAL_CACHE
        )
        metrics = load_config(path).metrics
        assert metrics.tls_cert_file == confdir / "tls" / "cert.pem"
        assert metrics.tls_key_file == confdir / "tls" / "key.pem"


# --------------------------------------------------------------------------- errors


class TestErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "missing.toml"
        assert only_problem(missing) == f"{missing}: file not found"

    def test_unreadable_path_is_a_directory(self, tmp_path: Path) -> None:
        problem = only_problem(tmp_path)
        assert problem.startswith(f"{tmp_path}: cannot read")

    def test_invalid_toml(self, write_config: Writer) -> None:
        path = write_config("[push\nworkers = 4\n")
        problem = only_problem(path)
        assert problem.startswith(f"{path}: invalid TOML: ")
        assert "line 2" in problem

    def test_unknown_top_level_key(self, write_config: Writer) -> None:
        path = write_config("colour = 'red'\n" + MINIMAL_CACHE)
        assert only_problem(path) == f"{path}:colour: unknown key"

    @pytest.mark.parametrize(
        ("section", "key"),
        [("push", "wrokers"), ("spool", "max_bytes"), ("metrics", "host")],
    )
    def test_unknown_key_in_settings_tables(
        self, write_config: Writer, section: str, key: str
    ) -> None:
        path = write_config(f"[{section}]\n{key} = 1\n" + MINIMAL_CACHE)
        assert only_problem(path) == f"{path}:{section}.{key}: unknown key"

    def test_unknown_key_in_cache(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + 'token = "x"\n')
        assert only_problem(path) == f"{path}:caches.c.token: unknown key"

    def test_unknown_key_in_rule(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + '[[rules]]\ncaches = ["c"]\njob = ["a:b:c"]\n')
        assert only_problem(path) == f"{path}:rules[0].job: unknown key"

    def test_unknown_key_in_second_rule_names_its_index(self, write_config: Writer) -> None:
        path = write_config(
            MINIMAL_CACHE + '[[rules]]\ncaches = ["c"]\n[[rules]]\ncaches = ["c"]\nx = 1\n'
        )
        assert only_problem(path) == f"{path}:rules[1].x: unknown key"

    def test_unknown_key_in_log_source(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + '[[log_sources]]\npath = "/x"\nfollow = true\n')
        assert only_problem(path) == f"{path}:log_sources[0].follow: unknown key"

    @pytest.mark.parametrize(
        ("body", "key", "message"),
        [
            ('[push]\nworkers = "4"\n', "push.workers", "must be an integer, got a string"),
            ("[push]\nworkers = 4.0\n", "push.workers", "must be an integer, got a number"),
            ("[push]\nworkers = true\n", "push.workers", "must be an integer, got a boolean"),
            ("[push]\nworkers = 0\n", "push.workers", "must be at least 1"),
            ("[push]\nbatch_size = -1\n", "push.batch_size", "must be at least 1"),
            (
                "[push]\ntimeout_seconds = true\n",
                "push.timeout_seconds",
                "must be an integer or a number, got a boolean",
            ),
            (
                "[push]\nbackoff_initial_seconds = 10\nbackoff_max_seconds = 5\n",
                "push.backoff_max_seconds",
                "must not be below backoff_initial_seconds",
            ),
            ("[spool]\nmax_event_bytes = 10\n", "spool.max_event_bytes", "must be at least 256"),
            ("[spool]\ngroup_writable = 1\n", "spool.group_writable", "must be a boolean"),
            ("[metrics]\nport = 70000\n", "metrics.port", "must be at most 65535"),
            ("[metrics]\nport = -1\n", "metrics.port", "must be at least 0"),
            ("[metrics]\nenabled = 'yes'\n", "metrics.enabled", "must be a boolean"),
            (
                '[metrics]\ntls_cert_file = "/c.pem"\n',
                "metrics.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ),
            ("log_level = 'loud'\n", "log_level", "must be one of debug, info, warning, error"),
            ("log_level = 3\n", "log_level", "must be a string, got an integer"),
            ("state_dir = ''\n", "state_dir", "must not be empty"),
            ("spool_dir = 5\n", "spool_dir", "must be a string, got an integer"),
            ("retention_days = -1\n", "retention_days", "must be at least 0"),
            ("log_poll_seconds = 0\n", "log_poll_seconds", "must be at least 0.05"),
            ("push = 5\n", "push", "must be a table, got an integer"),
            ("rules = 5\n", "rules", "must be a list, got an integer"),
        ],
    )
    def test_wrong_values_name_file_and_key(
        self, write_config: Writer, body: str, key: str, message: str
    ) -> None:
        # Top-level keys must come before the first table header in TOML.
        head, _, rest = body.partition("[")
        text = head + MINIMAL_CACHE + ("[" + rest if rest else "")
        path = write_config(text, state=not body.startswith("state_dir"))
        problem = only_problem(path)
        assert problem.startswith(f"{path}:{key}: "), problem
        assert message in problem

    @pytest.mark.parametrize(
        ("body", "key", "message"),
        [
            ("[caches.c]\nuri = 'file:///x'\n", "caches.c.backend", "is required"),
            (
                "[caches.c]\nbackend = 'attic'\n",
                "caches.c.backend",
                "must be one of cachix, nix-copy, got 'attic'",
            ),
            ("[caches.c]\nbackend = 'nix-copy'\n", "caches.c.uri", "is required for backend"),
            ("[caches.c]\nbackend = 'nix-copy'\nuri = ''\n", "caches.c.uri", "is required"),
            (
                "[caches.c]\nbackend = 'cachix'\nuri = 'file:///x'\n",
                "caches.c.uri",
                "is only for backend nix-copy",
            ),
            (
                "[caches.c]\nbackend = 'nix-copy'\nuri = 'file:///x'\nhostname = 'h'\n",
                "caches.c.hostname",
                "is only for backend cachix",
            ),
            (
                "[caches.c]\nbackend = 'nix-copy'\nuri = 'file:///x'\nauth_token_file = '/t'\n",
                "caches.c.auth_token_file",
                "is only for backend cachix",
            ),
            (
                "[caches.c]\nbackend = 'cachix'\nextra_args = ['-j', 4]\n",
                "caches.c.extra_args",
                "must be a list of strings",
            ),
            (
                "[caches.c]\nbackend = 'cachix'\nextra_args = '-j 4'\n",
                "caches.c.extra_args",
                "must be a list, got a string",
            ),
            (
                "[caches.c]\nbackend = 'cachix'\nmax_parallel = 0\n",
                "caches.c.max_parallel",
                "must be at least 1",
            ),
            (
                "[caches.c]\nbackend = 'cachix'\nauth_token_file = ''\n",
                "caches.c.auth_token_file",
                "must not be empty",
            ),
            ("caches = 3\n", "caches", "must be a table"),
            ("[caches]\nc = 3\n", "caches.c", "must be a table"),
        ],
    )
    def test_cache_errors(self, write_config: Writer, body: str, key: str, message: str) -> None:
        path = write_config(body)
        problem = only_problem(path)
        assert problem.startswith(f"{path}:{key}: "), problem
        assert message in problem

    @pytest.mark.parametrize(
        "uri",
        [
            "ssh://builder",
            "ssh-ng://builder?compress=true",
            "local",
            "daemon",
            "auto",
            "unix:///nix/var/nix/daemon-socket/socket",
            "/srv/other-store",
            "local?root=/srv/root",
        ],
    )
    def test_signing_key_on_a_store_that_does_not_sign(
        self, write_config: Writer, uri: str
    ) -> None:
        path = write_config(
            f'[caches.mirror]\nbackend = "nix-copy"\nuri = "{uri}"\n'
            'signing_key_file = "/run/keys/mirror.key"\n'
        )
        problem = only_problem(path)
        assert problem.startswith(f"{path}:caches.mirror.signing_key_file: "), problem
        assert "file://, s3://, http://, https://" in problem
        assert "unsigned" in problem

    def test_secret_key_in_the_uri_of_a_store_that_does_not_sign(
        self, write_config: Writer
    ) -> None:
        path = write_config('[caches.m]\nbackend = "nix-copy"\nuri = "ssh-ng://h?secret-key=/k"\n')
        assert only_problem(path).startswith(f"{path}:caches.m.uri: secret-key=: Nix signs only")

    @pytest.mark.parametrize(
        ("uri", "said"),
        [
            ("https://alice:hunter2@cache.example/upload", "holds a password"),
            ("ssh://alice:hunter2@builder", "holds a password"),
            ("ssh-ng://alice:@builder", "holds a password"),
            ("s3://bucket?region=eu-west-1&aws_secret_access_key=hunter2", "parameter"),
            ("https://cache.example?token=hunter2", "parameter"),
            ("s3://bucket?Password=hunter2", "parameter"),
        ],
    )
    def test_credentials_in_a_store_uri_are_refused(
        self, write_config: Writer, uri: str, said: str
    ) -> None:
        """Finding 9: a URI is on nix's command line, in errors, logs and `status`."""
        path = write_config(f'[caches.m]\nbackend = "nix-copy"\nuri = "{uri}"\n')
        problem = only_problem(path)
        assert problem.startswith(f"{path}:caches.m.uri: {said}"), problem
        assert "/proc/PID/cmdline" in problem
        assert "hunter2" not in problem

    @pytest.mark.parametrize(
        "uri",
        [
            "ssh://alice@builder:2222",
            "ssh-ng://builder?ssh-key=/run/keys/id&compress=true",
            "s3://bucket?region=eu-west-1&profile=cache&secret-key=/run/keys/k",
            "https://cache.example/upload?compression=zstd",
        ],
    )
    def test_store_uris_without_credentials_are_fine(self, write_config: Writer, uri: str) -> None:
        path = write_config(f'[caches.m]\nbackend = "nix-copy"\nuri = "{uri}"\n')
        assert load_config(path).caches["m"].uri == uri

    @pytest.mark.parametrize(
        "uri",
        [
            "file:///srv/cache",
            "file:///srv/cache?compression=zstd",
            "s3://bucket?region=eu-west-1",
            "http://cache.example",
            "https://cache.example/upload",
        ],
    )
    def test_signing_key_on_a_binary_cache_store(self, write_config: Writer, uri: str) -> None:
        path = write_config(
            f'[caches.m]\nbackend = "nix-copy"\nuri = "{uri}"\nsigning_key_file = "/k"\n'
        )
        assert load_config(path).caches["m"].signing_key_file == Path("/k")

    def test_signing_key_for_cachix_is_fine(self, write_config: Writer) -> None:
        path = write_config('[caches.c]\nbackend = "cachix"\nsigning_key_file = "/k"\n')
        assert load_config(path).caches["c"].signing_key_file == Path("/k")

    def test_literal_star_in_a_job_pattern_is_a_warning(self, write_config: Writer) -> None:
        path = write_config(
            MINIMAL_CACHE
            + "[[rules]]\ncaches = ['c']\njobs = ['*:*:*', 'proj:release-*:*']\n"
            + "[[rules]]\ncaches = ['c']\njobs = ['x*']\n"
        )
        config = load_config(path)
        assert config.warnings == (
            f"{path}:rules[0].jobs: warning: pattern 'proj:release-*:*': 'release-*' is matched "
            "literally, as Hydra does ('*' is a wildcard only as a whole part)",
            f"{path}:rules[1].jobs: warning: pattern 'x*': 'x*' is matched literally, as Hydra "
            "does ('*' is a wildcard only as a whole part)",
        )
        assert config.rules[0].jobs[1] == JobPattern("proj", "release-*", "*")

    def test_no_warnings_for_plain_patterns(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + "[[rules]]\ncaches = ['c']\njobs = ['p:*:*', '']\n")
        assert load_config(path).warnings == ()

    def test_no_cache_at_all(self, write_config: Writer) -> None:
        path = write_config("")
        assert only_problem(path) == f"{path}:caches: at least one [caches.NAME] table is required"

    def test_unknown_cache_in_rule(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + '[[rules]]\ncaches = ["c", "nope"]\n')
        assert only_problem(path) == f"{path}:rules[0].caches: unknown cache 'nope' (defined: c)"

    @pytest.mark.parametrize(
        ("rule", "key", "message"),
        [
            ("caches = []\n", "rules[0].caches", "is required"),
            ("jobs = ['a:b']\n", "rules[0].caches", "is required"),
            ("caches = ['c']\njobs = ['a:b:c:d']\n", "rules[0].jobs", "invalid job pattern"),
            ("caches = ['c']\njobs = [':::x']\n", "rules[0].jobs", "invalid job pattern"),
            ("caches = ['c']\njobs = 'a:b:c'\n", "rules[0].jobs", "must be a list"),
            ("caches = ['c']\nsources = ['cron']\n", "rules[0].sources", "unknown source 'cron'"),
            (
                "caches = ['c']\nsources = ['hook']\njobs = ['a:*:*']\n",
                "rules[0].jobs",
                "job patterns only match Hydra events",
            ),
            (
                "caches = ['c']\nbuild_statuses = [true]\n",
                "rules[0].build_statuses",
                "must be a list of Hydra build status integers",
            ),
            (
                "caches = ['c']\nbuild_statuses = ['0']\n",
                "rules[0].build_statuses",
                "must be a list of Hydra build status integers",
            ),
            (
                "caches = ['c']\nbuild_statuses = [-1]\n",
                "rules[0].build_statuses",
                "must be a list of Hydra build status integers",
            ),
            (
                "caches = ['c']\nbuild_statuses = 0\n",
                "rules[0].build_statuses",
                "must be a list, got an integer",
            ),
            ("caches = ['c']\nexclude = [1]\n", "rules[0].exclude", "must be a list of strings"),
        ],
    )
    def test_rule_errors(self, write_config: Writer, rule: str, key: str, message: str) -> None:
        path = write_config(MINIMAL_CACHE + "[[rules]]\n" + rule)
        problem = only_problem(path)
        assert problem.startswith(f"{path}:{key}: "), problem
        assert message in problem

    def test_bad_job_pattern_message_quotes_the_pattern(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + "[[rules]]\ncaches = ['c']\njobs = ['p:j:job:x']\n")
        assert "'p:j:job:x'" in only_problem(path)

    def test_rules_entry_not_a_table(self, write_config: Writer) -> None:
        path = write_config("rules = [1]\n" + MINIMAL_CACHE)
        assert only_problem(path) == f"{path}:rules[0]: must be a table"

    def test_log_source_without_path(self, write_config: Writer) -> None:
        path = write_config(MINIMAL_CACHE + "[[log_sources]]\n")
        assert only_problem(path) == f"{path}:log_sources[0].path: is required"

    def test_all_problems_are_reported_at_once(self, write_config: Writer) -> None:
        path = write_config(
            "bogus = 1\n[push]\nworkers = 0\n[caches.c]\nbackend = 'nix-copy'\n"
            "[[rules]]\ncaches = ['zz']\n"
        )
        problems = problems_of(path)
        keys = {p.removeprefix(f"{path}:").split(": ", 1)[0] for p in problems}
        assert keys == {"bogus", "push.workers", "caches.c.uri", "rules[0].caches"}
        assert all(p.startswith(f"{path}:") for p in problems)

    def test_parse_config_uses_given_file_name(self) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config({"x": 1}, "<memory>")
        assert "<memory>:x: unknown key" in info.value.problems


# --------------------------------------------------------------------------- job patterns


class TestJobPattern:
    def test_full_pattern(self) -> None:
        pattern = JobPattern.parse("proj:main:hello.x86_64-linux")
        assert pattern == JobPattern("proj", "main", "hello.x86_64-linux")
        assert str(pattern) == "proj:main:hello.x86_64-linux"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [("proj", ("proj", "*", "*")), ("proj:main", ("proj", "main", "*")), ("*", ("*",) * 3)],
    )
    def test_fewer_parts_mean_star(self, text: str, expected: tuple[str, str, str]) -> None:
        assert JobPattern.parse(text) == JobPattern(*expected)

    @pytest.mark.parametrize("text", ["a:b:c:d", "a:b:c:d:", ":::x", "a::::e"])
    def test_invalid(self, text: str) -> None:
        with pytest.raises(ValueError, match="invalid job pattern"):
            JobPattern.parse(text)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            # Perl's split /:/ drops trailing empty fields, as Hydra parses patterns.
            ("", ("*", "*", "*")),
            ("::", ("*", "*", "*")),
            ("::::", ("*", "*", "*")),
            ("proj:", ("proj", "*", "*")),
            ("proj:main:simple:", ("proj", "main", "simple")),
            ("a:b:c:", ("a", "b", "c")),
            # An empty field before a non-empty one stays: it must equal "".
            ("proj::simple", ("proj", "", "simple")),
            (":main:simple", ("", "main", "simple")),
        ],
    )
    def test_empty_fields_as_hydra_splits_them(
        self, text: str, expected: tuple[str, str, str]
    ) -> None:
        assert JobPattern.parse(text) == JobPattern(*expected)

    def test_literal_stars(self) -> None:
        assert JobPattern.parse("*:release-*:*").literal_stars() == ("release-*",)
        assert JobPattern.parse("*:*:*").literal_stars() == ()
        assert JobPattern.parse("a*:**:x*y").literal_stars() == ("a*", "**", "x*y")

    def test_star_matches_anything(self) -> None:
        pattern = JobPattern.parse("*:*:*")
        assert pattern.matches("p", "j", "job")
        assert pattern.matches("", "", "")

    def test_exact_match_only(self) -> None:
        pattern = JobPattern.parse("home:mybuild:*")
        assert pattern.matches("home", "mybuild", "anything.x86_64-linux")
        assert not pattern.matches("home", "mybuild2", "x")
        assert not pattern.matches("Home", "mybuild", "x")
        assert not pattern.matches("hom", "mybuild", "x")
        assert not pattern.matches("other", "mybuild", "x")

    def test_partial_glob_is_a_literal(self) -> None:
        pattern = JobPattern.parse("foo*:*:*")
        assert not pattern.matches("foo", "j", "x")
        assert not pattern.matches("foobar", "j", "x")
        assert pattern.matches("foo*", "j", "x")

    @pytest.mark.parametrize("text", ["p:j:hello.*", "p:j:?ello", "p:j:[h]ello"])
    def test_no_glob_or_regex_in_job_part(self, text: str) -> None:
        pattern = JobPattern.parse(text)
        assert not pattern.matches("p", "j", "hello")
        assert not pattern.matches("p", "j", "hello.x86_64-linux")
        assert pattern.matches("p", "j", pattern.job)

    def test_prefix_pattern_matches_any_jobset(self) -> None:
        pattern = JobPattern.parse("proj")
        assert pattern.matches("proj", "anything", "job")
        assert not pattern.matches("proj2", "anything", "job")

    def test_frozen(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            JobPattern.parse("a").project = "b"  # type: ignore[misc]


def test_toml_example_is_valid_toml() -> None:
    # Sanity: the example from the issue is itself valid TOML with two rules.
    assert len(tomllib.loads(EXAMPLE)["rules"]) == 2


# --------------------------------------------------------------------------- any input at all

KEYS = {
    "": ["state_dir", "spool_dir", "log_level", "retention_days", "log_poll_seconds"],
    "push": list(vars(PushSettings())),
    "spool": list(vars(SpoolSettings())),
    "metrics": list(vars(MetricsSettings())),
    "cache": [f.name for f in dataclasses.fields(CacheConfig) if f.name != "name"],
    "rule": ["caches", "jobs", "sources", "build_statuses", "exclude"],
    "log_source": ["path", "resolve_derivations"],
}
ODD_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
PLAUSIBLE = st.sampled_from(
    [
        "nix-copy",
        "cachix",
        "file:///tmp/hcb-c",
        "ssh-ng://h",
        "hydra",
        "hook",
        "info",
        "*:*:*",
        "p::j",
        "c",
        "/k",
        "k",
        "",
        ".",
        "\0",
        "a\nb",
    ]
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 65535, 65536, 10**9, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
    PLAUSIBLE,
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
)


def table(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(KEYS[kind]) | ODD_TEXT, VALUES, max_size=6)


CACHE_NAMES = st.sampled_from(["c", "mirror", "", "a.b", "x y", "\n"]) | ODD_TEXT
SHAPED = st.fixed_dictionaries(
    {},
    optional={
        **{key: VALUES for key in KEYS[""]},
        "push": table("push") | VALUES,
        "spool": table("spool") | VALUES,
        "metrics": table("metrics") | VALUES,
        "caches": st.dictionaries(CACHE_NAMES, table("cache") | VALUES, max_size=3) | VALUES,
        "rules": st.lists(table("rule") | VALUES, max_size=3) | VALUES,
        "log_sources": st.lists(table("log_source") | VALUES, max_size=2) | VALUES,
    },
)

# Values of the right type, in and out of range, so that many documents are valid.
NUMBERS = (
    st.integers(min_value=-5, max_value=10**6)
    | st.floats(min_value=-1, max_value=1e9)
    | st.sampled_from([math.nan, math.inf, 2**40, 10**12, 0.05, 0.1])
)
PATHS = st.sampled_from(["state", "sub/dir", "/nonexistent/hcb", ".", "", "k"]) | ODD_TEXT
NAMES = st.sampled_from(["c", "mirror"])
TYPED: dict[str, st.SearchStrategy[Any]] = {
    "state_dir": PATHS,
    "spool_dir": PATHS,
    "log_level": st.sampled_from(["debug", "info", "warning", "error", "trace"]),
    "group_writable": st.booleans(),
    "enabled": st.booleans(),
    "per_jobset": st.booleans(),
    "per_jobset_limit": st.integers(-5, 200_000),
    "resolve_derivations": st.booleans(),
    "listen_address": st.sampled_from(["127.0.0.1", "::1", "", "x"]),
    "tls_cert_file": PATHS,
    "tls_key_file": PATHS,
    "backend": st.sampled_from(["nix-copy", "cachix", "other"]),
    "uri": st.sampled_from(
        ["file:///tmp/hcb-fuzz-cache", "file://", "s3://b", "ssh-ng://h", "local", "daemon"]
    )
    | ODD_TEXT,
    "cachix_config": PATHS,
    "auth_token_file": PATHS,
    "signing_key_file": PATHS,
    "hostname": ODD_TEXT,
    "extra_args": st.lists(ODD_TEXT, max_size=3),
    "executable": st.sampled_from(["/bin/true", "true", "nope", "/nope"]) | ODD_TEXT,
    "caches": st.lists(NAMES, max_size=2),
    "jobs": st.lists(st.text(alphabet="ab*:", max_size=8), max_size=3),
    "sources": st.lists(st.sampled_from(["hydra", "hook", "log", "cron"]), max_size=3),
    "build_statuses": st.lists(st.integers(min_value=-1, max_value=100), max_size=3),
    "exclude": st.lists(ODD_TEXT, max_size=2),
    "path": PATHS,
}


def typed_table(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={key: TYPED.get(key, NUMBERS) for key in KEYS[kind]})


# Mostly in range: most of these documents are valid, so the config that comes out is used.
SANE: dict[str, st.SearchStrategy[Any]] = {
    **TYPED,
    "state_dir": st.sampled_from(["state", "/tmp/hcb-fuzz-state"]),
    "spool_dir": st.sampled_from(["spool", "state/spool"]),
    "path": st.sampled_from(["log", "/var/log/x.log"]),
    "backend": st.just("nix-copy"),
    "uri": st.sampled_from(["file:///tmp/hcb-fuzz-cache", "s3://b", "ssh-ng://h", "local"]),
    "executable": st.sampled_from(["/bin/true", "true", "nope"]),
    "caches": st.just(["c"]),
    "sources": st.just(["hydra", "hook"]),
    "build_statuses": st.lists(st.integers(min_value=0, max_value=99), max_size=3),
    "log_level": st.just("debug"),
    "listen_address": st.just("::1"),
}
SANE_NUMBER = st.integers(min_value=1, max_value=600)


def sane_table(kind: str, skip: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    keys = [k for k in KEYS[kind] if k not in skip]
    return st.fixed_dictionaries({}, optional={k: SANE.get(k, SANE_NUMBER) for k in keys})


SANE_DOCUMENTS = st.fixed_dictionaries(
    {
        "caches": st.fixed_dictionaries(
            {
                "c": sane_table("cache", ("cachix_config", "hostname", "auth_token_file")).map(
                    lambda t: {**t, "backend": "nix-copy", "uri": t.get("uri", "file:///tmp/x")}
                )
            }
        )
    },
    optional={
        "state_dir": SANE["state_dir"],
        "spool_dir": SANE["spool_dir"],
        "push": sane_table("push"),
        "spool": sane_table("spool", ("max_event_bytes",)),
        "metrics": sane_table("metrics", ("tls_cert_file", "tls_key_file")),
        "rules": st.lists(sane_table("rule"), max_size=2),
        "log_sources": st.lists(sane_table("log_source"), max_size=2),
    },
)


VALID_ISH = st.fixed_dictionaries(
    {
        "caches": st.dictionaries(
            NAMES,
            st.fixed_dictionaries({"backend": TYPED["backend"]}).flatmap(
                lambda head: typed_table("cache").map(lambda rest: {**rest, **head})
            ),
            min_size=1,
            max_size=2,
        )
    },
    optional={
        **{key: TYPED.get(key, NUMBERS) for key in KEYS[""]},
        "push": typed_table("push"),
        "spool": typed_table("spool"),
        "metrics": typed_table("metrics"),
        "rules": st.lists(typed_table("rule"), max_size=2),
        "log_sources": st.lists(typed_table("log_source"), max_size=2),
    },
)
DOCUMENTS = SANE_DOCUMENTS | VALID_ISH | SHAPED | st.dictionaries(ODD_TEXT, VALUES, max_size=5)


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    """A TOML rendering of value; tables are inline, so any nesting fits on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


def assert_clean_outcome(path: Path) -> None:
    """load_config either gives a config everything downstream can use, or a clean error."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        event("clean error")
        assert exc.problems
        for problem in exc.problems:
            assert problem.startswith(f"{path}:"), problem
            assert "\n" not in problem and "Traceback" not in problem, problem
        return
    numbers = [*vars(config.push).values(), *vars(config.spool).values()]
    numbers = [n for n in numbers if isinstance(n, int | float)]  # not [spool] hook_dir
    numbers += [config.retention_days, config.log_poll_seconds, config.metrics.port]
    assert all(math.isfinite(n) for n in numbers), numbers
    event("valid config")
    assert config.caches and all(config.caches)
    # Everything a command does with a valid config must not trip over it either.
    render_config(config)
    check_host(config)
    for cache in config.caches.values():
        assert "\0" not in repr(cache)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCUMENTS)
def test_any_toml_document_gives_a_config_or_a_clean_error(doc: dict[str, Any]) -> None:
    text = toml_document(doc)
    assert tomllib.loads(text).keys() == doc.keys()  # the writer is sound
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bridge.toml"
        path.write_text(text, encoding="utf-8")
        assert_clean_outcome(path)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200)
    | st.sampled_from([b"\xff\xfe", b'state_dir = "\xc3\x28"\n', b"\xef\xbb\xbfx = 1\n"])
    | st.builds(lambda doc: toml_document(doc).encode("utf-8")[:-3], SHAPED)
)
def test_any_bytes_give_a_config_or_a_clean_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bridge.toml"
        path.write_bytes(data)
        assert_clean_outcome(path)


def test_not_utf8(write_config: Writer, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'state_dir = "/var/lib/caf\xe9"\n')
    assert only_problem(path) == (f"{path}: not UTF-8 text (invalid continuation byte at byte 25)")

"""Unit tests for bridge.render: the effective config as TOML and the queue status."""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest

from bridge.config import default_config, load_config, parse_config
from bridge.render import mask_uri, render_config, render_status, status_document
from bridge.statedb import CacheHealth, CacheStatus, DeadLetter

TOKEN = "tok-SECRET-7f3a9c1e-do-not-print"
KEY = "key-SECRET-b41d2e88-do-not-print"
DHALL_TOKEN = "dhall-SECRET-0c55aa17-do-not-print"
PASSWORD = "pw-SECRET-99e1"
NOW = 1_700_000_000.0
OUT = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.1"


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "key").write_text(KEY)
    (directory / "cachix.dhall").write_text(
        f'{{ authToken = "{DHALL_TOKEN}", hostname = "https://cachix.org", '
        f'binaryCaches = [ {{ name = "mycache", secretKey = "{KEY}" }} ] }}\n'
    )
    return directory


@pytest.fixture
def config_file(tmp_path: Path, secrets: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'state_dir = "{tmp_path}/state"\n'
        f'spool_dir = "{tmp_path}/spool"\n'
        'log_level = "debug"\n'
        "[push]\nworkers = 2\nbatch_size = 8\ntimeout_seconds = 60\n"
        "[spool]\ngroup_writable = true\n"
        "[metrics]\nport = 9400\nper_jobset = true\n"
        "[caches.mycache]\n"
        'backend = "cachix"\n'
        f'cachix_config = "{secrets}/cachix.dhall"\n'
        f'auth_token_file = "{secrets}/token"\n'
        f'signing_key_file = "{secrets}/key"\n'
        'extra_args = ["--compression-method", "zstd"]\n'
        "[caches.mirror]\n"
        'backend = "nix-copy"\n'
        f'uri = "s3://minio.example:9000/bucket?region=eu&secret-key={secrets}/key"\n'
        '[caches."my.dotted"]\n'
        'backend = "nix-copy"\n'
        'uri = "file:///var/cache/dotted"\n'
        "[[rules]]\n"
        'jobs = ["home:mybuild:*", "other"]\n'
        'caches = ["mycache"]\n'
        "build_statuses = [0, 6]\n"
        'exclude = ["*-spec.json"]\n'
        "[[rules]]\n"
        'sources = ["hook"]\n'
        'caches = ["mirror", "my.dotted"]\n'
        "[[log_sources]]\n"
        'path = "logs/hook.log"\n'
    )
    return path


class TestRenderConfig:
    def test_output_is_valid_toml(self, config_file: Path) -> None:
        text = render_config(load_config(config_file))
        doc = tomllib.loads(text)
        assert doc["log_level"] == "debug"
        assert doc["push"]["workers"] == 2
        assert doc["spool"]["group_writable"] is True
        assert doc["metrics"]["port"] == 9400
        assert set(doc["caches"]) == {"mycache", "mirror", "my.dotted"}
        assert doc["caches"]["mycache"]["extra_args"] == ["--compression-method", "zstd"]
        assert doc["rules"][0]["jobs"] == ["home:mybuild:*", "other:*:*"]
        assert doc["rules"][0]["build_statuses"] == [0, 6]
        assert doc["rules"][1]["sources"] == ["hook"]
        assert len(doc["log_sources"]) == 1

    def test_round_trip_through_parse_config(self, config_file: Path) -> None:
        config = load_config(config_file)
        doc = tomllib.loads(render_config(config))
        again = parse_config(doc, str(config_file), base=config_file.parent)
        assert again.caches["mirror"] == config.caches["mirror"]
        assert again.caches["mycache"] == config.caches["mycache"]
        assert again.caches["my.dotted"] == config.caches["my.dotted"]
        assert again.rules == config.rules
        assert again.push == config.push
        assert again.spool == config.spool
        assert again.metrics == config.metrics
        assert again.log_sources == config.log_sources
        assert (again.state_dir, again.spool_dir) == (config.state_dir, config.spool_dir)

    def test_secret_contents_never_appear(self, config_file: Path) -> None:
        text = render_config(load_config(config_file))
        for secret in (TOKEN, KEY, DHALL_TOKEN, PASSWORD, "SECRET"):
            assert secret not in text
        # The file names are shown, with a note that they could be read.
        for key, name in (
            ("auth_token_file", "token"),
            ("signing_key_file", "key"),
            ("cachix_config", "cachix.dhall"),
        ):
            [line] = [x for x in text.splitlines() if x.startswith(f"{key} = ")]
            assert f'/{name}"' in line
            assert line.endswith("# readable; content not shown")

    def test_password_in_uri_is_masked(self, config_file: Path) -> None:
        # check-config refuses such a URI (issue 11); a Config built in code still masks it.
        config = load_config(config_file)
        mirror = config.caches["mirror"]
        uri = f"s3://user:{PASSWORD}@" + (mirror.uri or "").removeprefix("s3://")
        caches = {**config.caches, "mirror": dataclasses.replace(mirror, uri=uri)}
        config = dataclasses.replace(config, caches=MappingProxyType(caches))
        doc = tomllib.loads(render_config(config))
        uri = doc["caches"]["mirror"]["uri"]
        assert PASSWORD not in uri
        assert uri.startswith("s3://user:***@minio.example:9000/bucket?")
        assert "region=eu" in uri

    @pytest.mark.parametrize("kind", ["missing", "directory", "empty", "binary"])
    def test_unreadable_secret_file_is_flagged(self, tmp_path: Path, kind: str) -> None:
        token = tmp_path / "token"
        if kind == "directory":
            token.mkdir()
        elif kind == "empty":
            token.write_text("  \n")
        elif kind == "binary":
            token.write_bytes(b"\xff\xfe" + TOKEN.encode())
        path = tmp_path / "b.toml"
        path.write_text(
            f'state_dir = "{tmp_path}/s"\n[caches.c]\nbackend = "cachix"\n'
            f'auth_token_file = "{token}"\n'
        )
        text = render_config(load_config(path))
        [line] = [x for x in text.splitlines() if x.startswith("auth_token_file")]
        assert "NOT READABLE" in line
        assert str(token) in line
        assert "readable; content not shown" not in line
        assert TOKEN not in text
        assert tomllib.loads(text)["caches"]["c"]["auth_token_file"] == str(token)

    def test_relative_secret_resolved_in_credentials_directory(
        self, tmp_path: Path, secrets: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secrets))
        path = tmp_path / "b.toml"
        path.write_text(
            f'state_dir = "{tmp_path}/s"\n[caches.c]\nbackend = "cachix"\n'
            'auth_token_file = "token"\n'
        )
        text = render_config(load_config(path))
        [line] = [x for x in text.splitlines() if x.startswith("auth_token_file")]
        assert "readable; content not shown" in line
        assert TOKEN not in text

    def test_embedded_defaults(self, tmp_path: Path) -> None:
        config = default_config(tmp_path / "state")
        text = render_config(config)
        assert text.startswith("# effective configuration (embedded defaults)\n")
        doc = tomllib.loads(text)
        assert doc["state_dir"] == str(tmp_path / "state")
        assert doc["caches"]["local"]["backend"] == "nix-copy"
        assert doc["caches"]["local"]["uri"] == f"file://{tmp_path / 'state' / 'binary-cache'}"
        assert doc["rules"] == [
            {
                "caches": ["local"],
                "sources": ["hydra", "hook", "log", "hydra-db", "backfill"],
                "build_statuses": [0],
            }
        ]

    def test_source_file_is_named(self, config_file: Path) -> None:
        text = render_config(load_config(config_file))
        assert text.splitlines()[0] == f"# effective configuration ({config_file})"

    def test_strings_with_quotes_and_backslashes(self, tmp_path: Path) -> None:
        config = parse_config(
            {
                "state_dir": str(tmp_path / 'we"ird\\dir'),
                "caches": {"c": {"backend": "cachix", "extra_args": ['a"b', "c\\d", "e\nf"]}},
            },
            "<test>",
        )
        doc = tomllib.loads(render_config(config))
        assert doc["state_dir"] == str(tmp_path / 'we"ird\\dir')
        assert doc["caches"]["c"]["extra_args"] == ['a"b', "c\\d", "e\nf"]

    @pytest.mark.parametrize("name", ["caf\u00e9", "\u00fcber-cache", "\u7f13\u5b58"])
    def test_non_ascii_cache_names_stay_valid_toml(self, tmp_path: Path, name: str) -> None:
        config = parse_config(
            {"state_dir": str(tmp_path), "caches": {name: {"backend": "cachix"}}}, "<test>"
        )
        doc = tomllib.loads(render_config(config))
        assert list(doc["caches"]) == [name]
        assert doc["rules"][0]["caches"] == [name]

    def test_non_bmp_characters_in_paths_stay_valid_toml(self, tmp_path: Path) -> None:
        spool = str(tmp_path / "spool-\U0001f600")
        config = parse_config(
            {
                "state_dir": str(tmp_path),
                "spool_dir": spool,
                "caches": {"c": {"backend": "cachix"}},
            },
            "<test>",
        )
        assert tomllib.loads(render_config(config))["spool_dir"] == spool


class TestMaskUri:
    @pytest.mark.parametrize(
        ("uri", "expected"),
        [
            ("s3://u:p@host/b", "s3://u:***@host/b"),
            (
                "https://user:hunter2@cache.example:8443/x?y=1#z",
                "https://user:***@cache.example:8443/x?y=1#z",
            ),
            ("ssh-ng://builder:pw@10.0.0.1", "ssh-ng://builder:***@10.0.0.1"),
            ("https://:tok@host/", "https://:***@host/"),
        ],
    )
    def test_password_is_hidden(self, uri: str, expected: str) -> None:
        assert mask_uri(uri) == expected

    @pytest.mark.parametrize(
        "uri",
        [
            "file:///var/cache/nix",
            "ssh-ng://builder@host",
            "s3://bucket?region=eu-west-1&endpoint=minio.example",
            "https://cache.example/",
            "daemon",
            "",
        ],
    )
    def test_uri_without_password_unchanged(self, uri: str) -> None:
        assert mask_uri(uri) == uri

    def test_ipv6_host_keeps_brackets(self) -> None:
        masked = mask_uri("http://u:secretpw@[::1]:8080/x")
        assert "secretpw" not in masked
        assert masked == "http://u:***@[::1]:8080/x"


def status(cache: str = "mycache", **kw: object) -> CacheStatus:
    fields: dict[str, object] = {
        "counts": {"pending": 3, "inflight": 1, "pushed": 120, "skipped": 2, "dead": 1},
        "oldest_pending_at": NOW - 125,
        "last_success_at": NOW - 5,
        "last_failure_at": NOW - 3700,
        "last_error": "cachix exited 1: HTTP 502",
    }
    fields.update(kw)
    return CacheStatus(cache=cache, **fields)  # type: ignore[arg-type]


def dead(id: int = 7, **kw: object) -> DeadLetter:
    fields: dict[str, object] = {
        "cache": "mycache",
        "path": OUT,
        "attempts": 8,
        "updated_at": NOW - 2 * 86400 - 3 * 3600,
        "reason": "push_failed",
        "error": "timeout after 1800s",
    }
    fields.update(kw)
    return DeadLetter(id=id, **fields)  # type: ignore[arg-type]


class TestStatusDocument:
    def test_document(self) -> None:
        doc = status_document([status()], [dead()], NOW, daemon_running=True)
        assert doc == {
            "daemon_running": True,
            "time": NOW,
            "caches": [
                {
                    "cache": "mycache",
                    "counts": {"pending": 3, "inflight": 1, "pushed": 120, "skipped": 2, "dead": 1},
                    "oldest_pending_age_seconds": 125.0,
                    "last_success_at": NOW - 5,
                    "last_failure_at": NOW - 3700,
                    "last_error": "cachix exited 1: HTTP 502",
                    "state": "up",
                    "down_since": None,
                    "next_try_at": None,
                    "failed_pushes_while_down": 0,
                    "down_error": None,
                }
            ],
            "dead_letters": [
                {
                    "id": 7,
                    "cache": "mycache",
                    "path": OUT,
                    "attempts": 8,
                    "dead_at": NOW - 2 * 86400 - 3 * 3600,
                    "reason": "push_failed",
                    "error": "timeout after 1800s",
                }
            ],
        }

    def test_is_strict_json(self) -> None:
        doc = status_document(
            [status(), status("idle", oldest_pending_at=None)], [dead()], NOW, False
        )
        assert json.loads(json.dumps(doc, allow_nan=False)) == doc

    def test_nothing_pending_and_never_pushed(self) -> None:
        doc = status_document(
            [
                status(
                    oldest_pending_at=None,
                    last_success_at=None,
                    last_failure_at=None,
                    last_error=None,
                )
            ],
            [],
            NOW,
            daemon_running=False,
        )
        entry = doc["caches"][0]
        assert entry["oldest_pending_age_seconds"] is None
        assert entry["last_success_at"] is None and entry["last_error"] is None
        assert doc["dead_letters"] == []
        assert doc["daemon_running"] is False

    def test_age_never_negative(self) -> None:
        doc = status_document([status(oldest_pending_at=NOW + 30)], [], NOW, True)
        assert doc["caches"][0]["oldest_pending_age_seconds"] == 0.0


class TestRenderStatus:
    def test_table(self) -> None:
        text = render_status([status(), status("mirror", oldest_pending_at=None)], [], NOW, True)
        lines = text.splitlines()
        assert lines[0] == "daemon: running"
        header = lines[2]
        for column in (
            "cache",
            "pending",
            "in flight",
            "pushed",
            "skipped",
            "dead",
            "oldest pending",
            "last success",
            "last failure",
        ):
            assert column in header
        row = lines[3].split()
        assert row[:6] == ["mycache", "3", "1", "120", "2", "1"]
        assert "2m05s" in lines[3] and "2m05s ago" not in lines[3]
        assert "5s ago" in lines[3]
        assert "1h01m ago" in lines[3]
        mirror = lines[4]
        assert mirror.startswith("mirror ")
        assert " - " in mirror
        # Columns line up: each value starts where its header does.
        assert lines[3].index("120") == header.index("pushed")
        assert mirror.index("120") == header.index("pushed")
        assert "dead letters" not in text

    def test_not_running(self) -> None:
        assert render_status([], [], NOW, False).startswith("daemon: not running\n")

    def test_never(self) -> None:
        text = render_status(
            [status(last_success_at=None, last_failure_at=None, last_error=None)], [], NOW, True
        )
        assert text.splitlines()[3].split()[-2:] == ["never", "never"]

    @pytest.mark.parametrize(
        ("age", "shown"),
        [
            (0, "0s ago"),
            (59, "59s ago"),
            (60, "1m00s ago"),
            (3599, "59m59s ago"),
            (3600, "1h00m ago"),
            (86399, "23h59m ago"),
            (86400, "1d00h ago"),
            (90061, "1d01h ago"),
        ],
    )
    def test_age_formats(self, age: int, shown: str) -> None:
        text = render_status([status(last_success_at=NOW - age)], [], NOW, True)
        assert shown in text.splitlines()[3]

    def test_future_time_is_zero_seconds(self) -> None:
        text = render_status([status(last_success_at=NOW + 100)], [], NOW, True)
        assert "0s ago" in text.splitlines()[3]

    def test_last_error_shown_when_failure_is_newer(self) -> None:
        text = render_status(
            [status(last_success_at=NOW - 100, last_failure_at=NOW - 10)], [], NOW, True
        )
        assert "last error for mycache: cachix exited 1: HTTP 502" in text

    def test_last_error_hidden_after_a_later_success(self) -> None:
        text = render_status(
            [status(last_success_at=NOW - 10, last_failure_at=NOW - 100)], [], NOW, True
        )
        assert "last error" not in text

    def test_dead_letters_listed(self) -> None:
        text = render_status([status()], [dead(7), dead(9, cache="mirror", reason=None)], NOW, True)
        assert "retry with `hydra-cachix-bridge retry ID` or `--all`" in text
        assert (
            f"  #7 mycache {OUT} (8 attempts, 2d03h ago): push_failed: timeout after 1800s"
            in text.splitlines()
        )
        assert any(line.startswith("  #9 mirror ") for line in text.splitlines())
        assert text.endswith("\n")


DOWN = CacheHealth(
    "mycache",
    down_since=NOW - 754,
    next_try_at=NOW + 65,
    failures=12,
    last_error="cachix exited 1: HttpExceptionRequest ConnectionFailure",
)


class TestCacheHealth:
    def test_down_cache_says_since_when_next_try_and_why(self) -> None:
        text = render_status([status(health=DOWN), status("mirror")], [], NOW, True)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(NOW - 754))
        retry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(NOW + 65))
        assert (
            f"  mycache: DOWN since {since} (12m34s ago), next try at {retry} (in 1m05s), "
            "12 failed push(es), last error: cachix exited 1: HttpExceptionRequest "
            "ConnectionFailure"
        ) in text.splitlines()
        assert "  mirror: up" in text.splitlines()
        # The down line already names the error; no second "last error" line for it.
        assert "last error for mycache" not in text

    def test_overdue_probe_is_due_now(self) -> None:
        late = CacheHealth("mycache", down_since=NOW - 10, next_try_at=NOW - 1, failures=1)
        text = render_status([status(health=late)], [], NOW, True)
        assert "(due now)" in text and "last error: -" in text

    def test_up_without_recorded_health(self) -> None:
        assert "  mycache: up" in render_status([status()], [], NOW, True).splitlines()

    def test_document_for_a_down_cache(self) -> None:
        doc = status_document([status(health=DOWN)], [], NOW, daemon_running=True)
        [entry] = doc["caches"]
        assert entry["state"] == "down"
        assert entry["down_since"] == NOW - 754 and entry["next_try_at"] == NOW + 65
        assert entry["failed_pushes_while_down"] == 12
        assert entry["down_error"] == DOWN.last_error
        json.dumps(doc, allow_nan=False)


class TestHostileText:
    """Issue 11 finding 10: event text never forges or hides lines in `status`."""

    FORGED = "boom\nmycache: up\x1b[2J\u202egnp.evil"

    def test_errors_and_paths_are_escaped_in_the_table(self) -> None:
        text = render_status(
            [status(last_error=self.FORGED, last_failure_at=NOW - 1)],
            [dead(7, error=self.FORGED, path=OUT + "\u202e")],
            NOW,
            True,
        )
        assert "\x1b" not in text and "\u202e" not in text
        assert "mycache: up\\x1b[2J\\u202egnp.evil" in text
        # No line of the table starts with the forged text.
        assert not any(line.startswith("mycache: up") for line in text.splitlines())
        lines = [line for line in text.splitlines() if "boom" in line]
        assert len(lines) == 2 and all("boom\\nmycache" in line for line in lines)

    def test_down_reason_is_escaped(self) -> None:
        health = CacheHealth("mycache", NOW - 10, NOW + 10, 1, self.FORGED)
        text = render_status([status(health=health)], [], NOW, True)
        assert "\x1b" not in text and "\u202e" not in text and "\\nmycache: up" in text

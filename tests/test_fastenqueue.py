"""enqueue-hydra's fast path (bridge.fastenqueue, bridge.spooltarget) agrees with the full one.

The fast path may only accept what bridge.config, bridge.events and bridge.spool accept, and
must write the same bytes; everything else goes through bridge.cli (tests/test_cli.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bridge
from bridge.config import ConfigError, load_config
from bridge.events import EventRejected, decode_json, parse_hydra_payload
from bridge.fastenqueue import decode_json as fast_decode
from bridge.fastenqueue import encode_json, hydra_payload, is_store_path
from bridge.spooltarget import TargetError, read_simple_toml, read_spool_target
from bridge.storepath import is_store_path as full_is_store_path
from tests.nixhelpers import Built
from tests.nixhelpers import hydra_payload as make_payload
from tests.reliability.hostile_strategies import HYDRA_FIELDS

ROOT = Path(__file__).resolve().parent.parent
OUT = "/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"
DRV = "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv"
CACHE = '[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n'


def full_target(path: Path | None) -> tuple[str, int]:
    config = load_config(path)
    return str(config.spool_dir), config.spool.max_event_bytes


def fast_target(path: Path | None) -> tuple[str, int]:
    target = read_spool_target(None if path is None else str(path))
    return target.spool_dir, target.max_event_bytes


# -- the spool from the config -------------------------------------------------------------

CONFIGS = [
    "",
    'state_dir = "/srv/state"\n',
    'state_dir = "state"\n',
    'state_dir = "./a//b/./c/"\n',
    'state_dir = "../up"\n',
    'state_dir = "//net/state"\n',
    'state_dir = "///many"\n',
    'state_dir = "."\n',
    "state_dir = 'literal dir'\n",
    'state_dir = "/s"\nspool_dir = "/elsewhere/spool"\n',
    'state_dir = "/s"\nspool_dir = "rel/spool"\n',
    'spool_dir = "only-spool"\n',
    'state_dir = "/s"  # comment\r\nspool_dir = "/crlf"\r\n',
    '# a comment\nlog_level = "debug"\nstate_dir = "/s"\n',
    'state_dir = "/s"\n[spool]\nmax_event_bytes = 4096\ngroup_writable = true\n',
    'state_dir = "/s"\n[spool]\nmax_event_bytes = 256\nrescan_seconds = 0.5\n',
    'state_dir = "/s"\n[spool]\nmax_event_bytes = 67108864\n',
    # Beyond the simple reader: tomllib decides.
    '"state_dir" = "/quoted-key"\n',
    'state_dir = "/esc\\u0061ped"\n',
    'state_dir = """/multi"""\n',
    'spool.max_event_bytes = 2048\nstate_dir = "/s"\n',
    'state_dir = "/s"\n[spool]\nmax_event_bytes = 0x1000\n',
    'state_dir = "/s"\n[spool]\nmax_event_bytes = 4_096\n',
    'state_dir = "/s"\n[[rules]]\ncaches = [\n  "c",\n]\n',
]


@pytest.mark.parametrize("body", CONFIGS)
def test_spool_equals_the_full_loader(
    body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "sub" / "bridge.toml"
    path.parent.mkdir()
    path.write_text(body + "\n" + CACHE)
    assert fast_target(path) == full_target(path)
    # A relative config path: the base is its directory, from the working directory.
    monkeypatch.chdir(tmp_path)
    assert fast_target(Path("sub/bridge.toml")) == full_target(Path("sub/bridge.toml"))
    assert fast_target(Path("./sub//bridge.toml")) == full_target(Path("./sub//bridge.toml"))


@pytest.mark.parametrize("xdg", [None, "", "/x/state", "relative/state", "//two"])
@pytest.mark.parametrize("home", ["/home/h", "/", "//home", ""])
def test_defaults_equal_the_full_loader(
    xdg: str | None, home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", home)
    if xdg is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg)
    assert fast_target(None) == full_target(None)
    # A config without state_dir takes the default state directory, under its own base.
    path = tmp_path / "c.toml"
    path.write_text(CACHE)
    assert fast_target(path) == full_target(path)


@pytest.mark.parametrize(
    "body",
    [
        "state_dir = 5\n",
        'state_dir = ""\n',
        "state_dir = true\n",
        "state_dir = [1]\n",
        "state_dir = 1979-05-27T07:32:00Z\n",
        'state_dir = "a\\u0000b"\n',
        'spool_dir = ""\n',
        "spool_dir = 1.5\n",
        "spool = 3\n",
        "[spool]\nmax_event_bytes = true\n",
        "[spool]\nmax_event_bytes = 10\n",
        "[spool]\nmax_event_bytes = 1000000000\n",
        "[spool]\nmax_event_bytes = 4096.0\n",
        'state_dir = ""\nspool_dir = 2\n[spool]\nmax_event_bytes = "big"\n',
        "state_dir = \n",
        'state_dir = "/a"\nstate_dir = "/b"\n',
        "[spool]\n[spool]\n",
        "= 1\n",
        "\ufeffstate_dir = '/bom'\n",
    ],
)
def test_errors_equal_the_full_loader(body: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body + CACHE)
    with pytest.raises(ConfigError) as full:
        load_config(path)
    with pytest.raises(TargetError) as fast:
        read_spool_target(str(path))
    assert fast.value.problems == full.value.problems


def test_file_errors_equal_the_full_loader(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'state_dir = "/caf\xe9"\n')
    for path in (tmp_path / "missing.toml", tmp_path, latin):
        with pytest.raises(ConfigError) as full:
            load_config(path)
        with pytest.raises(TargetError) as fast:
            read_spool_target(str(path))
        assert fast.value.problems == full.value.problems


def test_other_settings_are_left_to_the_daemon(tmp_path: Path) -> None:
    """The producers need only the spool: a mistake elsewhere does not stop them."""
    path = tmp_path / "c.toml"
    path.write_text('state_dir = "/s"\n[push]\nworkers = "four"\n[caches]\n')
    with pytest.raises(ConfigError):
        load_config(path)
    assert fast_target(path) == ("/s/spool", 1024 * 1024)


LINES = st.sampled_from(
    [
        "",
        "# c",
        "#\x01",
        'a = "x"',
        "a = 'y'",
        'b = "dup"',
        "b = 1",
        "c = -0",
        "c = 01",
        "d = 1.5",
        "d = 1.",
        "d = +3",
        "e = true",
        "e = falsey",
        'f = ["a", 1, true, ]',
        "f = [",
        "f = [[1]]",
        "g = {x = 1}",
        "h = 1 # c",
        "h = 1 x",
        '"q" = 1',
        "k.l = 1",
        "[t]",
        "[t.u]",
        "[ t ]",
        "[t] x",
        "[[arr]]",
        "[[arr.sub]]",
        "[arr.x]",
        "[a]",
        "[b]",
        "[[b]]",
        "[t.a]",
        'x = "\t"',
        'x = "\x7f"',
        "y = 1979-05-27",
        'z = "\\n"',
        "w = '''multi'''",
    ]
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINES, max_size=8), crlf=st.booleans())
def test_simple_toml_reader_is_sound(lines: list[str], crlf: bool) -> None:
    """Whatever the simple reader returns is exactly what tomllib returns."""
    text = ("\r\n" if crlf else "\n").join(lines)
    simple = read_simple_toml(text)
    if simple is None:
        return
    assert simple == tomllib.loads(text), text


def test_simple_toml_reads_a_generated_config() -> None:
    """The shape the NixOS module writes (pkgs.formats.toml) takes the fast path."""
    text = (
        'log_level = "info"\nstate_dir = "/var/lib/hydra-cachix-bridge"\n\n'
        '[caches.main]\nauth_token_file = "cachix-token"\nbackend = "cachix"\n\n'
        '[metrics]\nlisten_address = "127.0.0.1"\nport = 9401\n\n'
        "[push]\nbackoff_initial_seconds = 5.0\nworkers = 4\n\n"
        '[[rules]]\ncaches = ["main"]\njobs = ["proj:main:*"]\nbuild_statuses = [0]\n\n'
        "[spool]\ngroup_writable = true\nmax_event_bytes = 1048576\n"
    )
    assert read_simple_toml(text) == tomllib.loads(text)


# -- the payload ---------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from([OUT, DRV, OUT + "/bin", "/nix/store/.x", "", "p\n", "buildFinished"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
# Every field Hydra sends, and one it does not.
KEYS = st.sampled_from([*HYDRA_FIELDS, "extra"])


def full_accepts(data: bytes) -> bool:
    try:
        parse_hydra_payload(decode_json(data), 0.0)
    except EventRejected:
        return False
    return True


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with some fields replaced, removed or mangled; sometimes raw bytes."""
    doc: Any = make_payload(int(draw(st.integers(0, 2**63 - 1))), Built("t", DRV, OUT))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(KEYS)
        action = draw(st.sampled_from(["set", "drop", "output"]))
        if action == "drop":
            doc.pop(key, None)
        elif action == "set":
            doc[key] = draw(JSON_VALUES)
        elif (
            isinstance(doc.get("outputs"), list)
            and doc["outputs"]
            # An earlier "set" may have made outputs a list of anything: mangle objects only.
            and isinstance(doc["outputs"][0], dict)
        ):
            doc["outputs"][0][draw(st.sampled_from(["name", "path", "x"]))] = draw(JSON_VALUES)
    text = json.dumps(doc)
    mangle = draw(st.sampled_from(["none", "none", "cut", "nan", "deep", "bytes", "ws"]))
    if mangle == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif mangle == "nan":
        text = text.replace('"stopTime"', '"x": NaN, "stopTime"', 1)
    elif mangle == "deep":
        text = text[:-1] + ', "deep": ' + "[" * 70 + "]" * 70 + "}"
    elif mangle == "ws":
        text = " \n" + text + "\t\r\n "
    data = text.encode()
    if mangle == "bytes":
        data = draw(st.binary(max_size=40)) + data
    return data


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads())
def test_payload_checks_agree_with_the_daemon(data: bytes) -> None:
    """The fast path accepts exactly what bridge.events accepts (except \\ud escapes, which it
    leaves to the full path)."""
    fast = hydra_payload(fast_decode(data)) is not None
    if b"\\ud" in data.lower():
        assert not fast
        return
    assert fast == full_accepts(data), data[:300]


@pytest.mark.parametrize(
    "text",
    [
        "1e400",
        "-1e400",
        "Infinity",
        "[NaN]",
        '"\\ud800"',
        '"\\uD800"',
        "\ufeff{}",
        "{} x",
        "[" * 100 + "]" * 100,
        "1" * 5000,
        '{"a": 1, "a": 2}',
        '"tab\there"',
    ],
)
def test_decoding_edge_cases(text: str) -> None:
    data = text.encode()
    try:
        expected: Any = decode_json(data)
    except EventRejected:
        assert fast_decode(data) is None
        return
    decoded = fast_decode(data)
    assert decoded is None or decoded == expected


@settings(max_examples=300, deadline=None)
@given(document=JSON_VALUES, now=st.floats(min_value=0, max_value=1e12))
def test_envelope_bytes_equal_write_event(document: Any, now: float) -> None:
    envelope = {"version": 1, "kind": "hydra", "received_at": now, "payload": document}
    expected = json.dumps(envelope, separators=(",", ":")).encode("ascii")
    assert encode_json(envelope) == expected


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=60),
        st.from_regex(r"/nix/store/[0-9a-z]{32}-[A-Za-z0-9+\-._?=ü]{0,5}", fullmatch=True),
        st.sampled_from([OUT, DRV, OUT + "\n", "/nix/store/" + "a" * 32 + "-" + "n" * 212]),
    )
)
def test_store_path_check_equals_the_regular_expression(value: str) -> None:
    assert is_store_path(value) == full_is_store_path(value)


# -- the command ---------------------------------------------------------------------------

PROBE = """
import sys
from bridge.entry import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
print(sorted(sys.modules))
"""


def test_fast_path_imports_no_click_config_or_daemon(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config(CACHE)
    spool = load_config(config).spool_dir
    for sub in ("incoming", "tmp", "quarantine"):
        (spool / sub).mkdir(parents=True)
    payload = tmp_path / "hydra.json"
    payload.write_text(json.dumps(make_payload(7, Built("t", DRV, OUT))))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "enqueue-hydra", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HYDRA_JSON=str(payload)),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first, modules = done.stdout.splitlines()
    assert first.startswith("recorded build 7 (proj:main:pkg.x86_64-linux) as hydra-")
    loaded = set(json.loads(modules.replace("'", '"')))
    forbidden = {
        "click",
        "bridge.config",
        "bridge.cli",
        "bridge.events",
        "bridge.spool",
        "prometheus_client",
        "watchdog",
        "sqlite3",
        "tomllib",
        "dataclasses",
    }
    assert forbidden & loaded == set()
    assert {"bridge.fastenqueue", "bridge.spooltarget"} <= loaded
    (event,) = (spool / "incoming").iterdir()
    assert json.loads(event.read_text())["payload"]["build"] == 7


def test_script_file_runs_the_command() -> None:
    """The installed command (a script file, see pyproject.toml) reaches the click group."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bridge" / "bin" / "hydra-cachix-bridge"), "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"hydra-cachix-bridge, version {bridge.__version__}\n"


def test_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project.get("dynamic", [])
    assert bridge.__version__ == project["version"]

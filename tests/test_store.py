"""bridge/store.py against the real local Nix store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import bridge.store
from bridge.store import (
    NixStore,
    PathInfo,
    StoreQueryError,
    outputs_from_drv_file,
    parse_path_info,
)
from tests.nixhelpers import Built, build, offline_env

pytestmark = pytest.mark.nix

MADE_UP = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hcb-never-built"
MADE_UP_DRV = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hcb-never-built.drv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    return build(tmp_path_factory.mktemp("store-nix"), 3, prefix="hcb-store")


@pytest.fixture(scope="module")
def multi_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A real derivation with two outputs; returns (drv, {output name: path})."""
    directory = tmp_path_factory.mktemp("store-multi")
    expr = directory / "multi.nix"
    name = f"hcb-store-multi-{directory.name}"
    expr.write_text(
        f'derivation {{ name = "{name}"; system = builtins.currentSystem;'
        ' builder = "/bin/sh"; outputs = [ "out" "dev" ];'
        ' args = [ "-c" "echo o > $out; echo d > $dev" ]; }\n'
    )
    drv = subprocess.run(
        ["nix-instantiate", str(expr)],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
    ).stdout.strip()
    paths = subprocess.run(
        ["nix-store", "--realise", drv],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
    ).stdout.split()
    assert len(paths) == 2
    dev = next(p for p in paths if p.endswith("-dev"))
    out = next(p for p in paths if p != dev)
    return drv, {"out": out, "dev": dev}


def test_resolve_outputs_reads_the_drv_file(built: list[Built]) -> None:
    store = NixStore()
    for b in built:
        assert outputs_from_drv_file(b.drv) == [b.out]
        assert store.resolve_outputs(b.drv) == [b.out]


def test_resolve_outputs_of_a_multi_output_derivation(
    multi_output: tuple[str, dict[str, str]],
) -> None:
    drv, outputs = multi_output
    resolved = NixStore().resolve_outputs(drv)
    assert sorted(resolved) == sorted(outputs.values())
    # The same answer Nix itself gives.
    nix = subprocess.run(
        ["nix-store", "--query", "--outputs", drv], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(resolved) == sorted(nix)


def test_resolve_outputs_falls_back_to_nix_store(
    built: list[Built], multi_output: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a derivation whose .drv file does not name its outputs: Nix is asked.
    monkeypatch.setattr(bridge.store, "outputs_from_drv_file", lambda _path: None)
    store = NixStore()
    assert store.resolve_outputs(built[0].drv) == [built[0].out]
    drv, outputs = multi_output
    assert sorted(store.resolve_outputs(drv)) == sorted(outputs.values())


def test_resolve_outputs_of_unknown_derivation_raises() -> None:
    with pytest.raises(StoreQueryError, match="nix-store --query failed"):
        NixStore().resolve_outputs(MADE_UP_DRV)


def test_content_addressed_derivation_asks_nix_and_reports_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A floating CA derivation has no output path in its .drv; Nix 2.8 cannot tell either."""
    monkeypatch.setenv(
        "NIX_CONFIG",
        offline_env()["NIX_CONFIG"] + "\nextra-experimental-features = ca-derivations\n",
    )
    expr = tmp_path / "ca.nix"
    expr.write_text(
        f'derivation {{ name = "hcb-store-ca-{tmp_path.name}"; system = builtins.currentSystem;'
        ' builder = "/bin/sh"; args = [ "-c" "echo ca > $out" ];'
        ' __contentAddressed = true; outputHashMode = "recursive";'
        ' outputHashAlgo = "sha256"; }\n'
    )
    drv = subprocess.run(
        ["nix-instantiate", str(expr)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert outputs_from_drv_file(drv) is None
    with pytest.raises(StoreQueryError) as caught:
        NixStore().resolve_outputs(drv)
    assert "nix-store --query failed" in str(caught.value)


def test_outputs_from_drv_file_on_other_files(built: list[Built], tmp_path: Path) -> None:
    assert outputs_from_drv_file(built[0].out) is None  # an output, not a derivation
    assert outputs_from_drv_file(str(tmp_path / "missing.drv")) is None
    junk = tmp_path / "junk.drv"
    junk.write_bytes(b"\x00\xff not an ATerm")
    assert outputs_from_drv_file(str(junk)) is None
    bad_path = tmp_path / "bad.drv"
    bad_path.write_text('Derive([("out","/tmp/not-a-store-path","","")],[],[])')
    assert outputs_from_drv_file(str(bad_path)) is None


def test_invalid_paths(built: list[Built]) -> None:
    store = NixStore()
    assert store.invalid_paths([]) == set()
    assert store.invalid_paths([b.out for b in built]) == set()
    assert store.invalid_paths([MADE_UP]) == {MADE_UP}
    mixed = [built[0].out, MADE_UP, built[1].out, MADE_UP_DRV]
    assert store.invalid_paths(mixed) == {MADE_UP, MADE_UP_DRV}
    # Derivations are valid store paths too.
    assert store.invalid_paths([built[2].drv]) == set()


def test_nar_sizes_match_nix_path_info(built: list[Built]) -> None:
    paths = [b.out for b in built]
    sizes = NixStore().nar_sizes(paths)
    info = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", *paths],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
    ).stdout
    # Whatever shape this Nix prints (a list up to 2.18, an object keyed by path after).
    expected = {path: entry.nar_size for path, entry in parse_path_info(info).items() if entry}
    assert sizes == expected
    assert all(size > 0 for size in sizes.values())
    assert NixStore().nar_sizes([]) == {}


def test_nar_sizes_with_an_invalid_path_gives_the_valid_ones(built: list[Built]) -> None:
    # `nix-store --query --size` fails for the whole list; `nix path-info` answers per path.
    sizes = NixStore().nar_sizes([built[0].out, MADE_UP])
    assert list(sizes) == [built[0].out] and sizes[built[0].out] > 0


def test_path_info_on_this_nix(built: list[Built]) -> None:
    info = NixStore().path_info([built[0].out, MADE_UP, built[1].out])
    assert info[MADE_UP] is None
    for b in built[:2]:
        entry = info[b.out]
        assert entry is not None and entry.path == b.out and entry.nar_size > 0
    assert NixStore().path_info([]) == {}


# Recorded with Nix 2.8.0 (Debian 12) and Nix 2.26.3 (Debian 13), same two paths.
VALID = "/nix/store/0s8wpd48lwq2py024m0v32c7s56xvxw3-hcb-lat-d769737c4da0-0"
PATH_INFO_2_8 = (
    '[{"path":"' + VALID + '","narHash":"sha256-R7m9FNEQ4ORtE1lo+MelVN85b7BLE/7A43QXoa+onO4=",'
    '"narSize":136,"references":[],"deriver":"/nix/store/a4hi406zj2z9sg967hsd70bqyvmpyy2z-'
    'hcb-lat-d769737c4da0-0.drv","registrationTime":1796051729,"ultimate":true},'
    '{"path":"' + MADE_UP + '","valid":false}]'
)
PATH_INFO_2_26 = (
    '{"' + VALID + '":{"ca":null,"deriver":"/nix/store/a4hi406zj2z9sg967hsd70bqyvmpyy2z-'
    'hcb-lat-d769737c4da0-0.drv","narHash":"sha256-R7m9FNEQ4ORtE1lo+MelVN85b7BLE/7A43QXoa+onO4=",'
    '"narSize":136,"references":[],"registrationTime":1796051729,"signatures":[],'
    '"ultimate":true},"' + MADE_UP + '":null}'
)


@pytest.mark.parametrize("text", [PATH_INFO_2_8, PATH_INFO_2_26], ids=["nix-2.8", "nix-2.26"])
def test_parse_path_info_reads_both_shapes(text: str) -> None:
    assert parse_path_info(text) == {VALID: PathInfo(VALID, 136), MADE_UP: None}


@pytest.mark.parametrize("text", ["", "not json", "42", '"x"'])
def test_parse_path_info_rejects_what_is_not_path_info(text: str) -> None:
    with pytest.raises(StoreQueryError):
        parse_path_info(text)


def test_parse_path_info_ignores_odd_entries() -> None:
    text = '[{"path": "/tmp/x", "narSize": 1}, 7, {"narSize": 3}, {"path": "' + VALID + '"}]'
    assert parse_path_info(text) == {VALID: PathInfo(VALID, 0)}
    assert parse_path_info('{"' + VALID + '": {"narSize": -5}, "/tmp/y": {}}') == {
        VALID: PathInfo(VALID, 0)
    }


def test_path_info_error_is_a_store_query_error(tmp_path: Path) -> None:
    with pytest.raises(StoreQueryError, match="no-nix"):
        NixStore(nix=str(tmp_path / "no-nix")).path_info([MADE_UP])


def test_missing_nix_store_executable_raises(tmp_path: Path, built: list[Built]) -> None:
    store = NixStore(nix_store=str(tmp_path / "no-nix-store"))
    with pytest.raises(StoreQueryError, match="no-nix-store"):
        store.invalid_paths([built[0].out])


@pytest.fixture
def store_fifo_drv(tmp_path: Path) -> Iterator[str]:
    """Finding 4: a store symlink named `*.drv` pointing at a FIFO, left by `nix-store --add`.

    Nix reads a `.drv` it adds to check it; through the link that read waits for a FIFO
    writer forever, so the add is cut short and the link stays in the store directory.
    """
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / f"hcb-evil-{tmp_path.name[-8:]}.drv"
    link.symlink_to(fifo)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["nix-store", "--add", str(link)], capture_output=True, timeout=3)
    found = [p for p in Path("/nix/store").glob(f"*-{link.name}") if p.is_symlink()]
    if not found:
        pytest.skip("this Nix leaves no link behind when adding a symlink named *.drv")
    yield str(found[0])
    # The link and the lock file the interrupted `nix-store --add` left behind.
    for path in [*found, *Path("/nix/store").glob(f"*-{link.name}.lock")]:
        path.unlink(missing_ok=True)


def test_a_store_drv_that_links_to_a_fifo_does_not_block(store_fifo_drv: str) -> None:
    outcome: list[BaseException | list[str]] = []

    def resolve() -> None:
        try:
            outcome.append(NixStore().resolve_outputs(store_fifo_drv))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "reading the .drv blocked on the FIFO"
    assert isinstance(outcome[0], StoreQueryError)
    assert "not a regular file" in str(outcome[0])


def test_drv_reads_never_follow_links_or_open_fifos(built: list[Built], tmp_path: Path) -> None:
    fifo = tmp_path / "x.drv"
    os.mkfifo(fifo)
    with pytest.raises(StoreQueryError, match="not a regular file"):
        outputs_from_drv_file(str(fifo))
    link = tmp_path / "link.drv"
    link.symlink_to(built[0].drv)
    with pytest.raises(StoreQueryError, match="not a regular file"):
        outputs_from_drv_file(str(link))

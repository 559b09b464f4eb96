"""Unit tests for bridge.storepath: which strings count as Nix store paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.storepath import STORE_DIR, is_derivation_path, is_store_path, path_name

# 32 characters of Nix's base-32 alphabet (0-9 and a-z without e, o, t, u).
HASH = "0123456789abcdfghijklmnpqrsvwxyz"
assert len(HASH) == 32


def sp(name: str, digest: str = HASH) -> str:
    return f"/nix/store/{digest}-{name}"


class TestIsStorePath:
    @pytest.mark.parametrize(
        "name",
        [
            "hello-2.12.1",
            "a",
            "foo.drv",
            "x+y_z?=A-9",
            "source",
            "name-with-dots...",
            "n" * 211,
        ],
    )
    def test_accepts_valid_names(self, name: str) -> None:
        assert is_store_path(sp(name))

    @pytest.mark.parametrize("bad_char", ["e", "o", "t", "u", "A", "Z", "_", "-", "."])
    def test_rejects_hash_outside_nix_base32(self, bad_char: str) -> None:
        digest = bad_char + HASH[1:]
        assert len(digest) == 32
        assert not is_store_path(sp("hello", digest))

    @pytest.mark.parametrize("digest", [HASH[:31], HASH + "0", ""])
    def test_rejects_wrong_hash_length(self, digest: str) -> None:
        assert not is_store_path(sp("hello", digest))

    @pytest.mark.parametrize(
        "name",
        [
            "",
            " hello",
            "hel lo",
            "hello\n",
            "hello\x00",
            "h\u00e9llo",
            "a/b",
            "a@b",
            "a$(touch x)",
            'a"b',
            "a'b",
            "a;b",
            "a`b`",
            "n" * 212,
        ],
    )
    def test_rejects_invalid_names(self, name: str) -> None:
        assert not is_store_path(sp(name))

    def test_trailing_newline_is_not_accepted(self) -> None:
        # A regex with `$` would accept a trailing newline; fullmatch must not.
        assert not is_store_path(sp("hello") + "\n")

    @pytest.mark.parametrize("name", [".hidden", ".", "..", ".drv"])
    def test_rejects_names_starting_with_a_dot(self, name: str) -> None:
        assert not is_store_path(sp(name))

    @pytest.mark.parametrize(
        "path",
        [
            sp("hello") + "/bin/hello",
            sp("hello") + "/",
            "/nix/store/" + HASH,
            "/nix/store/" + HASH + "-",
            "/nix/store",
            "/nix/store/",
            "/gnu/store/" + HASH + "-hello",
            "nix/store/" + HASH + "-hello",
            "/nix//store/" + HASH + "-hello",
            "//nix/store/" + HASH + "-hello",
            "/nix/store/../store/" + HASH + "-hello",
            " " + sp("hello"),
            sp("hello") + " " + sp("other"),
        ],
    )
    def test_rejects_paths_that_are_not_top_level_store_paths(self, path: str) -> None:
        assert not is_store_path(path)

    @pytest.mark.parametrize(
        "value",
        [None, 42, 4.2, True, b"/nix/store/" + HASH.encode() + b"-hello", Path(sp("hello")), []],
    )
    def test_rejects_non_strings(self, value: object) -> None:
        assert not is_store_path(value)


class TestIsDerivationPath:
    def test_accepts_drv(self) -> None:
        assert is_derivation_path(sp("hello-2.12.1.drv"))

    @pytest.mark.parametrize(
        "value",
        [
            sp("hello-2.12.1"),
            sp("hello.drv") + "/x",
            sp("hello.DRV"),
            sp("hello.drv.bak"),
            sp(".drv"),
            "/tmp/" + HASH + "-hello.drv",
            "hello.drv",
            None,
            7,
        ],
    )
    def test_rejects_non_derivations(self, value: object) -> None:
        assert not is_derivation_path(value)


class TestPathName:
    def test_returns_name_after_hash(self) -> None:
        assert path_name(sp("hello-2.12.1")) == "hello-2.12.1"
        assert path_name(sp("x.drv")) == "x.drv"

    def test_store_dir_constant(self) -> None:
        assert STORE_DIR == "/nix/store"
        assert path_name(f"{STORE_DIR}/{HASH}-a-b-c") == "a-b-c"

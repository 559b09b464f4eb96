"""Unit tests for bridge.settings: settings declared on dataclass fields, read by one reader."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from bridge.settings import TableReader, declared, declared_defaults, setting


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    depth: int = setting(3, minimum=1, maximum=10)
    ratio: float = setting(0.5, minimum=0)
    undeclared: str = "not a TOML key"


@dataclass(frozen=True)
class Outer:
    colour: Colour = field(metadata=declared(required="is required (one of {choices})"))
    name: str | None = setting(None)
    flag: bool = setting(False)
    where: Path | None = setting(None, resolve=True)
    secret: Path | None = setting(None)
    shades: tuple[Colour, ...] = setting((Colour.RED,), invalid="unknown {value!r}")
    codes: tuple[int, ...] = setting((0,), minimum=0, maximum=9, items="digits")
    inner: Inner = field(default_factory=Inner, metadata=declared())
    extra: Inner | None = setting(None)
    parts: tuple[Inner, ...] = setting(())

    def check(self) -> Iterator[tuple[str, str]]:
        if self.flag and self.name is None:
            yield "flag", "needs a name"


def read(table: dict[str, Any]) -> tuple[Outer, list[str]]:
    problems: list[str] = []
    reader = TableReader("F", table, "", problems, Path("/base"))
    outer = reader.build(Outer)
    reader.finish()
    return outer, problems


def test_every_kind_is_read_and_converted() -> None:
    outer, problems = read(
        {
            "colour": "blue",
            "name": "n",
            "flag": True,
            "where": "rel",
            "secret": "rel",
            "shades": ["blue", "red"],
            "codes": [1, 9],
            "inner": {"depth": 10, "ratio": 2},
            "extra": {},
            "parts": [{"depth": 2}],
        }
    )
    assert problems == []
    assert outer.colour is Colour.BLUE
    assert outer.where == Path("/base/rel")
    assert outer.secret == Path("rel")
    assert outer.shades == (Colour.BLUE, Colour.RED)
    assert all(isinstance(s, Colour) for s in outer.shades)
    assert outer.codes == (1, 9)
    assert outer.inner == Inner(depth=10, ratio=2.0)
    assert isinstance(outer.inner.ratio, float)
    assert outer.extra == Inner()
    assert outer.parts == (Inner(depth=2),)


def test_missing_keys_take_the_declared_defaults() -> None:
    outer, problems = read({"colour": "red"})
    assert problems == []
    assert outer == Outer(colour=Colour.RED)
    assert outer.extra is None


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, ["F:colour: is required (one of red, blue)"]),
        (
            {"colour": 1},
            [
                "F:colour: must be a string, got an integer",
                "F:colour: is required (one of red, blue)",
            ],
        ),
        # A value outside the enum is reported once, without the `required` message.
        ({"colour": ""}, ["F:colour: must be one of red, blue, got ''"]),
        ({"colour": "red", "flag": True}, ["F:flag: needs a name"]),
        ({"colour": "red", "where": ""}, ["F:where: must not be empty"]),
        ({"colour": "red", "shades": ["green", "red"]}, ["F:shades: unknown 'green'"]),
        ({"colour": "red", "codes": [10]}, ["F:codes: must be a list of digits"]),
        ({"colour": "red", "codes": [True]}, ["F:codes: must be a list of digits"]),
        ({"colour": "red", "inner": {"depth": 0}}, ["F:inner.depth: must be at least 1"]),
        ({"colour": "red", "inner": {"depth": 11}}, ["F:inner.depth: must be at most 10"]),
        (
            {"colour": "red", "inner": {"ratio": 1e300}},
            ["F:inner.ratio: must be at most 3.1536e+07"],
        ),
        (
            {"colour": "red", "inner": {"ratio": float("nan")}},
            ["F:inner.ratio: must be a finite number"],
        ),
        ({"colour": "red", "inner": {"undeclared": "x"}}, ["F:inner.undeclared: unknown key"]),
        ({"colour": "red", "inner": 5}, ["F:inner: must be a table, got an integer"]),
        ({"colour": "red", "parts": [1]}, ["F:parts[0]: must be a table"]),
        ({"colour": "red", "parts": [{"x y": 1}]}, ['F:parts[0]."x y": unknown key']),
        ({"colour": "red", "name": "a\0b"}, ["F:name: must not contain a NUL character"]),
    ],
)
def test_problems_name_file_and_key(table: dict[str, Any], expected: list[str]) -> None:
    assert read(table)[1] == expected


def test_rejected_values_fall_back_to_the_default() -> None:
    outer, _ = read({"colour": "red", "inner": {"depth": 0, "ratio": "x"}, "codes": [-1]})
    assert outer.inner == Inner()
    assert outer.codes == (0,)


def test_declared_defaults_walk_sections_with_defaults() -> None:
    assert declared_defaults(Outer) == {
        "name": None,
        "flag": False,
        "where": None,
        "secret": None,
        "shades": (Colour.RED,),
        "codes": (0,),
        "inner.depth": 3,
        "inner.ratio": 0.5,
        "extra": None,
        "parts": (),
    }


def test_an_annotation_without_a_reader_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        when: complex = setting(0j)

    reader = TableReader("F", {"when": 1}, "", [], Path("/"))
    with pytest.raises(TypeError, match="no TOML reading"):
        reader.build(Odd)

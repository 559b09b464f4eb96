"""Hypothesis strategies shared by the hostile-input tests: hostile text, store paths and
near misses, JSON values with numbers beyond a double, and mutated Hydra payloads."""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

from tests.reliability.hostile import INJECTIONS

# ----------------------------------------------------------------------------- strategies

HASH_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
NAME_ALPHABET = string.ascii_letters + string.digits + "+-._?="
FRAGMENTS = [
    *INJECTIONS,
    *";|&$()`'\"<>\n\r\t *?~\\",
    " ",
    "\x00",
    "\x7f",
    "\x1b[31m",
    "\ud800",
    "\udfff",
    "\udcff",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\u00e9",
    "\U0001f4a3",
    "../",
    "/..",
    "..",
    "/",
    "\\u0000",
    "\\ud800",
    "%s%n",
    "--",
    "-",
    "=",
    "${HOME}",
]

hashes = st.text(HASH_ALPHABET, min_size=32, max_size=32)
store_names = st.text(NAME_ALPHABET, min_size=1, max_size=50).filter(
    lambda n: not n.startswith(".")
)
good_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}", hashes, store_names)
good_drvs = st.builds(lambda h, n: f"/nix/store/{h}-{n}.drv", hashes, store_names)
hostile_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=6).map("".join),
)


PATH_VARIANTS = [
    "/nix/store/{h}-{n}",
    "/nix/store/{h}-{n}{f}",
    "/nix/store/{h}-{f}{n}",
    "/nix/store/{h}-{n}/{f}",
    "/nix/store/{h}-{n}/../../../etc/passwd",
    "/nix/store/../{h}-{n}",
    "/nix/store/{h31}-{n}",
    "/nix/store/{h31}e-{n}",
    "/nix/store/{h}u-{n}",
    "/nix/store/{H}-{n}",
    " /nix/store/{h}-{n}",
    "/nix/store/{h}-{n}\n",
    "/nix/store/{h}-{n}\n/nix/store/{h}-{n}",
    "/nix/store/{h}-{long}",
    "/nix/store/{h}-.{n}",
    "/nix/store/{h}-{n}\x00",
    "//nix/store/{h}-{n}",
    "/nix//store/{h}-{n}",
    "/nix/store/{h}-{n}/",
    "/nix/store/{h}-",
    "/nix/store/{h}-{n} /nix/store/{h}-{n}",
    "{f}",
    "/nix/store/{h}-{n}{i}",
]


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    """Valid store paths, and near misses: metacharacters, traversal, bad hash, newlines…"""
    template = draw(st.sampled_from(PATH_VARIANTS))
    h = draw(hashes)
    values = {
        "h": h,
        "h31": h[:31],
        "H": h.upper(),
        "n": draw(store_names),
        "long": "x" * 212,
        "f": draw(hostile_text) if "{f}" in template else "",
        "i": draw(st.sampled_from(INJECTIONS)) if "{i}" in template else "",
    }
    return template.format(**values)


BIG_NUMBERS = st.sampled_from(
    [
        -1,
        2**31,
        2**53 + 1,
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        2**64,
        10**30,
        10**400,
        -(10**400),
        10**4299,
        1e308,
        -1e308,
        5e-324,
        1.5,
        float("inf"),
        float("nan"),
    ]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    BIG_NUMBERS,
    st.floats(),
    st.text(max_size=20),
    hostile_text,
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), hostile_text), kids, max_size=4),
    ),
    max_leaves=10,
)
job_names = st.one_of(
    st.text(NAME_ALPHABET + ":", min_size=1, max_size=20),
    st.sampled_from(INJECTIONS),
    hostile_text,
)
HYDRA_FIELDS = [
    "event",
    "build",
    "finished",
    "timestamp",
    "startTime",
    "stopTime",
    "project",
    "jobset",
    "job",
    "drvPath",
    "buildStatus",
    "nixName",
    "system",
    "homepage",
    "description",
    "license",
    "outputs",
    "products",
    "metrics",
]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@st.composite
def hydra_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A complete buildFinished payload (REFERENCE.md §1) with hostile mutations."""
    payload: dict[str, Any] = {
        "event": "buildFinished",
        "build": draw(st.integers(1, 10**9)),
        "finished": True,
        "timestamp": 1_700_000_000,
        "startTime": 1_700_000_010,
        "stopTime": draw(st.one_of(st.none(), st.integers(0, 2**40), st.floats(0, 1e12))),
        "project": draw(job_names),
        "jobset": draw(job_names),
        "job": draw(job_names),
        "drvPath": draw(good_drvs),
        "buildStatus": draw(st.sampled_from([0, 0, 0, 1, 2, 6, 13, None])),
        "nixName": draw(st.one_of(st.none(), hostile_text)),
        "system": "x86_64-linux",
        "homepage": None,
        "description": draw(st.one_of(st.none(), hostile_text)),
        "license": None,
        "outputs": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.text(max_size=6), "path": st.one_of(good_paths, st.none())}
                ),
                max_size=4,
            )
        ),
        "products": [],
        "metrics": [{"name": "closure-size", "unit": "bytes", "value": 120}],
    }
    for _ in range(draw(st.integers(0, 3))):
        op = draw(
            st.sampled_from(["set", "delete", "add", "outputs", "number", "deep", "drv", "name"])
        )
        if op == "set":
            payload[draw(st.sampled_from(HYDRA_FIELDS))] = draw(json_values)
        elif op == "delete":
            payload.pop(draw(st.sampled_from(HYDRA_FIELDS)), None)
        elif op == "add":
            payload[draw(hostile_text)] = draw(json_values)
        elif op == "outputs":
            payload["outputs"] = draw(
                st.lists(
                    st.one_of(
                        st.fixed_dictionaries({"name": hostile_text, "path": hostile_paths()}),
                        json_values,
                    ),
                    max_size=5,
                )
            )
        elif op == "number":
            key = draw(st.sampled_from(["build", "buildStatus", "timestamp", "startTime"]))
            payload[draw(st.sampled_from([key, "stopTime"]))] = draw(BIG_NUMBERS)
        elif op == "deep":
            # Around Python's recursion limit, where decode and re-encode may disagree.
            payload["deep"] = nested(draw(st.integers(1, 1100)))
        elif op == "drv":
            payload["drvPath"] = draw(st.one_of(hostile_paths(), json_values))
        else:
            payload[draw(st.sampled_from(["project", "jobset", "job"]))] = draw(
                st.one_of(hostile_text, json_values, st.text(min_size=1000, max_size=1100))
            )
    return payload


def dump(draw: st.DrawFn, document: Any) -> bytes:
    """Serialise like a producer might (or might get wrong), then maybe corrupt the bytes."""
    text = json.dumps(
        document,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 0, 2])),
    )
    # Lone surrogates become CESU-8-like bytes: not UTF-8.
    data = text.encode("utf-8", "surrogatepass")
    op = draw(st.sampled_from(["none"] * 6 + ["truncate", "nul", "ff", "bom", "flip", "tail"]))
    if op == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "nul":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\x00" + data[at:]
    elif op == "ff":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe" + data[at:]
    elif op == "bom":
        data = b"\xef\xbb\xbf" + data
    elif op == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif op == "tail":
        data += draw(st.sampled_from([b"\n", b" {}", b"]", b"\x00", b"\n{}\n"]))
    return data

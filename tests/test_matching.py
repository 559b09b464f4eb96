"""Unit tests for bridge.matching: which caches each path of an event goes to."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import ConfigError, parse_config
from bridge.events import Event
from bridge.matching import JobPattern, MatchResult, Rule, match_event
from exporter.vocabulary import IgnoreReason

OUT = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.1"
DEV = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello-2.12.1-dev"
SPEC = "/nix/store/00000000000000000000000000000000-build-spec.json"
DRV = "/nix/store/11111111111111111111111111111111-hello-2.12.1.drv"


def hydra(
    *paths: str,
    status: int | None = 0,
    project: str = "home",
    jobset: str = "mybuild",
    job: str = "hello.x86_64-linux",
) -> Event:
    return Event(
        source="hydra",
        received_at=1.0,
        out_paths=paths,
        drv_path=DRV,
        build_id=1,
        project=project,
        jobset=jobset,
        job=job,
        build_status=status,
    )


def hook(*paths: str) -> Event:
    return Event(source="hook", received_at=1.0, out_paths=paths, drv_path=DRV)


def log(*paths: str) -> Event:
    return Event(source="log", received_at=1.0, out_paths=paths)


def rule(*caches: str, jobs: tuple[str, ...] = (), **kw: object) -> Rule:
    return Rule(caches=caches, jobs=tuple(JobPattern.parse(j) for j in jobs), **kw)  # type: ignore[arg-type]


def targets(result: MatchResult) -> set[tuple[str, str]]:
    return set(result.targets)


class TestMatchResult:
    def test_targets_decide_a_match(self) -> None:
        assert MatchResult((("c", OUT),)).targets
        assert not MatchResult((), "no_rule").targets

    def test_reasons_are_bounded(self) -> None:
        assert tuple(IgnoreReason) == ("no_rule", "status_filtered", "excluded", "no_outputs")

    def test_frozen(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            MatchResult(()).ignored_reason = "x"  # type: ignore[misc]


class TestBasicMatching:
    def test_catch_all_rule_sends_every_output_to_its_caches(self) -> None:
        result = match_event(hydra(OUT, DEV), [rule("a", "b")])
        assert result.targets == (("a", OUT), ("b", OUT), ("a", DEV), ("b", DEV))
        assert result.ignored_reason is None
        assert result.targets

    def test_catch_all_rule_matches_every_source(self) -> None:
        for event in (hydra(OUT), hook(OUT), log(OUT)):
            assert match_event(event, [rule("c")]).targets == (("c", OUT),)

    def test_no_rules_at_all(self) -> None:
        result = match_event(hydra(OUT), [])
        assert result == MatchResult((), "no_rule")
        assert not result.targets


class TestJobs:
    @pytest.mark.parametrize(
        ("pattern", "matches"),
        [
            ("home:mybuild:*", True),
            ("home:mybuild:hello.x86_64-linux", True),
            ("home", True),
            ("*:*:hello.x86_64-linux", True),
            ("home:other:*", False),
            ("home:mybuild:hello", False),
            ("home:my*:*", False),
            ("hom*", False),
            ("other", False),
        ],
    )
    def test_job_patterns(self, pattern: str, matches: bool) -> None:
        result = match_event(hydra(OUT), [rule("c", jobs=(pattern,))])
        if matches:
            assert result.targets == (("c", OUT),)
        else:
            assert result == MatchResult((), "no_rule")

    def test_any_of_several_patterns(self) -> None:
        r = rule("c", jobs=("nope:*:*", "home:mybuild:*"))
        assert match_event(hydra(OUT), [r]).targets == (("c", OUT),)

    def test_job_rules_never_match_hook_events(self) -> None:
        result = match_event(hook(OUT), [rule("c", jobs=("*:*:*",))])
        assert result == MatchResult((), "no_rule")

    def test_job_rules_never_match_log_events(self) -> None:
        assert match_event(log(OUT), [rule("c", jobs=("*",))]).ignored_reason == "no_rule"

    def test_hydra_event_without_job_fields_does_not_match_job_rule(self) -> None:
        event = dataclasses.replace(hydra(OUT), job=None)
        assert match_event(event, [rule("c", jobs=("*",))]).ignored_reason == "no_rule"


class TestSources:
    def test_sources_filter(self) -> None:
        rules = [rule("hydra-cache", sources=("hydra",)), rule("hook-cache", sources=("hook",))]
        assert match_event(hydra(OUT), rules).targets == (("hydra-cache", OUT),)
        assert match_event(hook(OUT), rules).targets == (("hook-cache", OUT),)
        assert match_event(log(OUT), rules) == MatchResult((), "no_rule")

    def test_log_source(self) -> None:
        rules = [rule("l", sources=("log",))]
        assert match_event(log(OUT), rules).targets == (("l", OUT),)
        assert match_event(hook(OUT), rules).ignored_reason == "no_rule"


class TestStatuses:
    def test_default_only_success(self) -> None:
        assert match_event(hydra(OUT, status=0), [rule("c")]).targets == (("c", OUT),)
        for status in (1, 2, 3, 4, 6, 7, 13, None):
            result = match_event(hydra(OUT, status=status), [rule("c")])
            assert result == MatchResult((), "status_filtered"), status

    def test_configured_statuses(self) -> None:
        r = rule("c", build_statuses=(0, 6, 13))
        for status in (0, 6, 13):
            assert match_event(hydra(OUT, status=status), [r]).targets
        assert match_event(hydra(OUT, status=1), [r]).ignored_reason == "status_filtered"

    def test_hook_and_log_events_bypass_build_statuses(self) -> None:
        r = rule("c", build_statuses=(99,))
        assert match_event(hook(OUT), [r]).targets == (("c", OUT),)
        assert match_event(log(OUT), [r]).targets == (("c", OUT),)

    def test_status_per_rule(self) -> None:
        rules = [rule("ok"), rule("failed", build_statuses=(1, 6))]
        assert match_event(hydra(OUT, status=6), rules).targets == (("failed", OUT),)
        assert match_event(hydra(OUT, status=0), rules).targets == (("ok", OUT),)
        assert match_event(hydra(OUT, status=7), rules).ignored_reason == "status_filtered"

    def test_no_rule_beats_status_filtered(self) -> None:
        r = rule("c", jobs=("other:*:*",))
        assert match_event(hydra(OUT, status=1), [r]).ignored_reason == "no_rule"


class TestExclude:
    def test_exclude_glob_on_name(self) -> None:
        r = rule("c", exclude=("*-spec.json",))
        result = match_event(hydra(OUT, SPEC), [r])
        assert result.targets == (("c", OUT),)

    def test_all_excluded(self) -> None:
        r = rule("c", exclude=("*-spec.json",))
        assert match_event(hydra(SPEC), [r]) == MatchResult((), "excluded")

    def test_exclude_applies_to_name_not_hash_or_store_dir(self) -> None:
        assert match_event(hydra(OUT), [rule("c", exclude=("0123*",))]).targets
        assert match_event(hydra(OUT), [rule("c", exclude=("/nix/store/*",))]).targets
        assert not match_event(hydra(OUT), [rule("c", exclude=("hello-*",))]).targets

    def test_exclude_is_case_sensitive(self) -> None:
        assert match_event(hydra(OUT), [rule("c", exclude=("HELLO-*",))]).targets

    @pytest.mark.parametrize(("pattern", "excluded"), [("*-dev", True), ("hello-?.*", True)])
    def test_glob_forms(self, pattern: str, excluded: bool) -> None:
        result = match_event(hydra(OUT, DEV), [rule("c", exclude=(pattern,))])
        assert (("c", DEV) not in result.targets) is excluded

    def test_exclude_of_one_rule_does_not_affect_another(self) -> None:
        rules = [rule("a", exclude=("*-dev",)), rule("b")]
        result = match_event(hydra(OUT, DEV), rules)
        assert targets(result) == {("a", OUT), ("b", OUT), ("b", DEV)}

    def test_excluded_versus_status_filtered(self) -> None:
        # One rule would take the path but excludes it; the other filters the status.
        rules = [rule("a", exclude=("hello-*",)), rule("b", build_statuses=(1,))]
        assert match_event(hydra(OUT), rules).ignored_reason == "excluded"


class TestUnion:
    def test_union_of_caches_of_several_rules(self) -> None:
        rules = [
            rule("mycache", jobs=("home:mybuild:*",)),
            rule("mirror", sources=("hydra", "hook")),
            rule("mycache", "third"),
        ]
        result = match_event(hydra(OUT), rules)
        assert result.targets == (("mycache", OUT), ("mirror", OUT), ("third", OUT))

    def test_no_duplicate_targets(self) -> None:
        rules = [rule("c"), rule("c"), rule("c", "c")]
        assert match_event(hydra(OUT, OUT), rules).targets == (("c", OUT),)

    def test_order_is_stable(self) -> None:
        rules = [rule("b"), rule("a")]
        first = match_event(hydra(OUT, DEV), rules)
        assert first == match_event(hydra(OUT, DEV), rules)
        assert first.targets == (("b", OUT), ("a", OUT), ("b", DEV), ("a", DEV))

    def test_example_config_rules(self) -> None:
        rules = [
            rule(
                "mycache", jobs=("home:mybuild:*",), build_statuses=(0,), exclude=("*-spec.json",)
            ),
            rule("mirror", sources=("hook",)),
        ]
        assert match_event(hydra(OUT, SPEC), rules).targets == (("mycache", OUT),)
        assert match_event(hook(OUT, SPEC), rules).targets == (("mirror", OUT), ("mirror", SPEC))
        other = hydra(OUT, project="elsewhere")
        assert match_event(other, rules).ignored_reason == "no_rule"
        assert match_event(hydra(OUT, status=1), rules).ignored_reason == "status_filtered"


class TestNoOutputs:
    def test_hydra_event_without_outputs(self) -> None:
        assert match_event(hydra(), [rule("c")]) == MatchResult((), "no_outputs")

    def test_hook_event_without_outputs(self) -> None:
        assert match_event(hook(), [rule("c")]).ignored_reason == "no_outputs"

    def test_no_rule_and_status_are_checked_before_outputs(self) -> None:
        assert match_event(hydra(), [rule("c", sources=("hook",))]).ignored_reason == "no_rule"
        assert match_event(hydra(status=1), [rule("c")]).ignored_reason == "status_filtered"

    def test_every_reason_is_in_the_bounded_set(self) -> None:
        cases = [
            match_event(hydra(OUT), []),
            match_event(hydra(OUT, status=1), [rule("c")]),
            match_event(hydra(SPEC), [rule("c", exclude=("*",))]),
            match_event(hydra(), [rule("c")]),
        ]
        assert [c.ignored_reason for c in cases] == list(IgnoreReason)


# --------------------------------------------------------------------------- Hydra's rules

# What Hydra's RunCommand plugin does with `job = PATTERN` for build proj:main:simple
# (NixOS/hydra subprojects/hydra/lib/Hydra/Plugin/RunCommand.pm, configSectionMatches:
# `split /:/` drops trailing empty fields, more than three fields dies, a missing field is
# "*", "*" matches anything, anything else must be `eq`). MATCH / NO / ERROR.
MATCH, NO, ERROR = "match", "no match", "error"
BUILD = ("proj", "main", "simple")
HYDRA_TABLE: list[tuple[str, tuple[str, str, str], str]] = [
    # The cases of the issue (REFERENCE §1, checked with Hydra's own Perl).
    ("", BUILD, MATCH),
    ("proj", BUILD, MATCH),
    ("proj:", BUILD, MATCH),
    ("proj::", BUILD, MATCH),
    ("proj:main:", BUILD, MATCH),
    ("::", BUILD, MATCH),
    ("proj:main:simple:", BUILD, MATCH),
    ("proj::simple", BUILD, NO),
    ("a:b:c:d", BUILD, ERROR),
    ("foo*", BUILD, NO),
    # Wildcards are whole parts only.
    ("*", BUILD, MATCH),
    ("*:*", BUILD, MATCH),
    ("*:*:*", BUILD, MATCH),
    ("proj:*:simple", BUILD, MATCH),
    ("*:main:*", BUILD, MATCH),
    ("*:*:other", BUILD, NO),
    ("pro*", BUILD, NO),
    ("proj:ma*:*", BUILD, NO),
    ("proj:main:simp*", BUILD, NO),
    ("**:*:*", BUILD, NO),
    ("foo*", ("foo*", "main", "simple"), MATCH),
    ("proj:release-*", ("proj", "release-*", "simple"), MATCH),
    ("proj:release-*", ("proj", "release-1", "simple"), NO),
    # Not regular expressions, not globs, not case-insensitive, not trimmed.
    (".*:.*:.*", BUILD, NO),
    ("proj:main:s.*", BUILD, NO),
    ("pro?", BUILD, NO),
    ("[p]roj", BUILD, NO),
    ("PROJ", BUILD, NO),
    (" proj", BUILD, NO),
    ("proj ", BUILD, NO),
    # Exact parts.
    ("proj:main", BUILD, MATCH),
    ("proj:main:simple", BUILD, MATCH),
    ("proj:other", BUILD, NO),
    ("other", BUILD, NO),
    ("proj:main:simple.x86_64-linux", BUILD, NO),
    ("p:j:hello.x86_64-linux", ("p", "j", "hello.x86_64-linux"), MATCH),
    # Empty fields: trailing ones vanish, inner and leading ones must equal "".
    (":", BUILD, MATCH),
    (":::", BUILD, MATCH),
    ("::::", BUILD, MATCH),
    ("proj:main:simple::", BUILD, MATCH),
    ("proj:main:simple:::", BUILD, MATCH),
    ("*:", BUILD, MATCH),
    (":*", BUILD, NO),
    (":main:simple", BUILD, NO),
    (":main:simple", ("", "main", "simple"), MATCH),
    ("::simple", BUILD, NO),
    ("proj::", ("proj", "", "simple"), MATCH),
    ("proj::simple", ("proj", "", "simple"), MATCH),
    ("proj:main:", ("proj", "main", ""), MATCH),
    # Four or more fields (after trailing empty ones are dropped) are an error.
    ("proj:main:simple:extra", BUILD, ERROR),
    ("proj:main:simple:extra:", BUILD, ERROR),
    (":::x", BUILD, ERROR),
    ("a::::e", BUILD, ERROR),
    ("*:*:*:*", BUILD, ERROR),
]


def bridge_verdict(pattern: str, build: tuple[str, str, str]) -> str:
    """What the bridge does with `jobs = [pattern]` for a Hydra event of `build`."""
    try:
        config = parse_config(
            {
                "caches": {"c": {"backend": "nix-copy", "uri": "file:///tmp/c"}},
                "rules": [{"caches": ["c"], "jobs": [pattern]}],
            },
            "<table>",
        )
    except ConfigError as exc:
        assert all(p.startswith("<table>:rules[0].jobs: invalid job pattern") for p in exc.problems)
        return ERROR
    project, jobset, job = build
    result = match_event(hydra(OUT, project=project, jobset=jobset, job=job), config.rules)
    return MATCH if result.targets else NO


@pytest.mark.parametrize(("pattern", "build", "expected"), HYDRA_TABLE)
def test_job_patterns_mean_what_they_mean_to_hydra(
    pattern: str, build: tuple[str, str, str], expected: str
) -> None:
    assert bridge_verdict(pattern, build) == expected


# The same rules in Perl, so that `split /:/` is Perl's own and not our reading of it.
PERL_ORACLE = r"""
use strict; use warnings; use JSON::PP;
while (my $line = <STDIN>) {
    my ($name, $project, $jobset, $job) = @{ decode_json($line) };
    my @elems = split /:/, $name;
    if (scalar(@elems) > 3) { print "error
"; next; }
    my @want = map { $elems[$_] // "*" } 0 .. 2;
    my @got = ($project, $jobset, $job);
    my $ok = 1;
    for my $i (0 .. 2) { $ok = 0 if $want[$i] ne "*" && $got[$i] ne $want[$i]; }
    print $ok ? "match
" : "no match
";
}
"""


def perl_verdicts(cases: list[tuple[str, tuple[str, str, str]]]) -> list[str]:
    perl = shutil.which("perl")
    if perl is None:
        pytest.skip("perl is not installed")
    stdin = "".join(json.dumps([pattern, *build]) + "\n" for pattern, build in cases)
    done = subprocess.run(
        [perl, "-e", PERL_ORACLE], input=stdin, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def test_the_table_is_what_perl_computes() -> None:
    cases = [(pattern, build) for pattern, build, _ in HYDRA_TABLE]
    assert perl_verdicts(cases) == [expected for _, _, expected in HYDRA_TABLE]


PARTS = st.text(alphabet="ab*:. -", max_size=12)
VALUES = st.sampled_from(["", "a", "b", "*", "a*", "ab", ".", " a", "a:b"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(PARTS, st.tuples(VALUES, VALUES, VALUES)), min_size=1, max_size=40))
def test_random_patterns_agree_with_perl(cases: list[tuple[str, tuple[str, str, str]]]) -> None:
    assert [bridge_verdict(p, b) for p, b in cases] == perl_verdicts(cases)

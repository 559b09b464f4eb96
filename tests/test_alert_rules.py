"""The alert rules: promtool checks and unit tests, runbooks, Grafana counterparts and the
metric names they use.

PyYAML is not a dependency of the project: the files are read with it when it is
importable, otherwise with the small YAML-subset reader below (and when PyYAML is there,
the reader is checked against it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from exporter.metrics import BridgeMetrics, HydraDbMetrics, QueueCollector
from exporter.vocabulary import ItemState

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "grafana" / "prometheus" / "hydra-cachix-bridge.rules.yaml"
RULE_TESTS = ROOT / "grafana" / "prometheus" / "hydra-cachix-bridge.rules.test.yaml"
GRAFANA_RULES = ROOT / "grafana" / "provisioning" / "alerting" / "hydra-cachix-bridge.yaml"
# Opt-in rules (users add the file to rule_files themselves), with their own unit tests.
OPT_IN_RULES = ROOT / "grafana" / "prometheus" / "hydra-cachix-bridge.no-events.rules.yaml"
OPT_IN_TESTS = ROOT / "grafana" / "prometheus" / "hydra-cachix-bridge.no-events.rules.test.yaml"
DS_UID_VARIABLE = "HYDRA_CACHIX_BRIDGE_PROMETHEUS_DS_UID"
RUNBOOK = ROOT / "docs" / "alerts.md"
RUNBOOK_BASE = (
    "https://github.com/hydra-cachix-bridge/hydra-cachix-bridge/blob/main/docs/alerts.md#"
)
GROUP = "hydra-cachix-bridge"
SEVERITIES = {"critical", "warning", "info"}
ANNOTATIONS = ("summary", "description", "runbook_url")
METRIC_NAME = re.compile(r"\bhydra_cachix_bridge_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(hydra_cachix_bridge_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


# -- a reader for the YAML subset these files use ------------------------------------------


def _strip_comment(text: str) -> str:
    """Drop a trailing ` # comment` from a plain (unquoted) value."""
    return re.sub(r"(^|\s)#.*$", "", text).strip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith('"'):
        end = 1
        while text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        body = text[1:end]
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), body)
    if text.startswith("'"):
        match = re.match(r"'((?:[^']|'')*)'", text)
        assert match, f"unterminated string: {text}"
        return match[1].replace("''", "'")
    text = _strip_comment(text)
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(part) for part in text[1:-1].split(",") if part.strip()]
    if text.startswith("{") and text.endswith("}"):
        pairs = (part.split(":", 1) for part in text[1:-1].split(",") if part.strip())
        return {key.strip(): _scalar(value) for key, value in pairs}
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    if text in ("", "~", "null"):
        return None
    return text


class MiniYaml:
    """Block mappings and sequences, plain/quoted scalars, `|`/`>` block scalars, `[a, b]`."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    @classmethod
    def load(cls, text: str) -> Any:
        reader = cls(text)
        found = reader._peek()
        return None if found is None else reader._block(found[0])

    def _peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next line with content, skipping blanks and comments."""
        while self.i < len(self.lines):
            line = self.lines[self.i]
            content = line.strip()
            if content and not content.startswith("#"):
                return len(line) - len(line.lstrip(" ")), content
            self.i += 1
        return None

    def _block(self, indent: int) -> Any:
        found = self._peek()
        assert found is not None
        if found[1] == "-" or found[1].startswith("- "):
            return self._sequence(indent)
        return self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (found := self._peek()) is not None and found[0] == indent:
            content = found[1]
            if not (content == "-" or content.startswith("- ")):
                break
            rest = content[1:].strip()
            if not rest:
                self.i += 1
                nxt = self._peek()
                items.append(self._block(nxt[0]) if nxt and nxt[0] > indent else None)
            elif re.match(r"[\w.-]+:(\s|$)", rest):
                # "- key: value": the item is a mapping indented past the dash.
                line = self.lines[self.i]
                self.lines[self.i] = line.replace("-", " ", 1)
                items.append(self._mapping(indent + (len(content) - len(rest))))
            else:
                self.i += 1
                items.append(_scalar(rest))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while (found := self._peek()) is not None and found[0] == indent:
            content = found[1]
            if content.startswith("- "):
                break
            key, sep, rest = content.partition(":")
            assert sep, f"line {self.i + 1}: expected `key: value`, got {content!r}"
            rest = rest.strip()
            self.i += 1
            if rest and rest[0] in "|>" and _strip_comment(rest) in ("|", "|-", ">", ">-"):
                mapping[key] = self._block_scalar(indent, _strip_comment(rest))
            elif _strip_comment(rest) == "":
                nxt = self._peek()
                if nxt and (nxt[0] > indent or (nxt[0] == indent and nxt[1].startswith("- "))):
                    mapping[key] = self._block(nxt[0])
                else:
                    mapping[key] = None
            else:
                mapping[key] = _scalar(rest)
        return mapping

    def _block_scalar(self, indent: int, style: str) -> str:
        raw: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            raw.append(line)
            self.i += 1
        while raw and not raw[-1].strip():
            raw.pop()
        if not raw:
            return ""
        cut = min(len(line) - len(line.lstrip(" ")) for line in raw if line.strip())
        body = [line[cut:] for line in raw]
        text = " ".join(body) if style.startswith(">") else "\n".join(body)
        return text if style.endswith("-") else text + "\n"


def load_yaml(path: Path) -> Any:
    """The file's data: PyYAML when importable, the subset reader otherwise."""
    text = path.read_text(encoding="utf-8")
    if yaml is not None:
        return yaml.safe_load(text)
    return MiniYaml.load(text)


# -- the rules ------------------------------------------------------------------------------


def prometheus_rules(path: Path = RULES) -> list[dict[str, Any]]:
    """The alerting rules of a Prometheus rules file (by default the main one)."""
    groups = load_yaml(path)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def grafana_rules() -> list[dict[str, Any]]:
    """The rules of the Grafana alerting provisioning file."""
    return [rule for group in load_yaml(GRAFANA_RULES)["groups"] for rule in group["rules"]]


def _grafana_query(rule: dict[str, Any]) -> str:
    """The Prometheus query of a Grafana rule (its refId A)."""
    (query,) = (d for d in rule["data"] if d["refId"] == "A")
    return str(query["model"]["expr"]).strip()


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, PromQL expression) of every Prometheus rule and every Grafana query.

    Grafana's are named "<title> (Grafana)". Used by the integration test that evaluates
    each of them against a real Prometheus scraping a real bridge.
    """
    found = [(rule["alert"], str(rule["expr"]).strip()) for rule in prometheus_rules()]
    found += [(f"{rule['title']} (Grafana)", _grafana_query(rule)) for rule in grafana_rules()]
    found += [(r["alert"], str(r["expr"]).strip()) for r in prometheus_rules(OPT_IN_RULES)]
    return found


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: the test command installs Debian's prometheus")
    return binary


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(int(n) * units[u] for n, u in parts)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lowercase, punctuation dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_headings() -> list[str]:
    text = RUNBOOK.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no headings in code
    return [m[1].strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)]


def registry_samples() -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, as a fresh bridge exposes them before any event."""
    registry = CollectorRegistry()
    caches = {"team": "cachix", "mirror": "nix-copy"}
    BridgeMetrics(
        registry,
        version="0.0.0",
        caches=caches,
        log_sources=["/var/log/hydra/hook.log"],
    )
    registry.register(QueueCollector(lambda: ({}, {}), caches, time.time))
    HydraDbMetrics(registry)  # registered when [hydra_db] is configured
    samples: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", [RULES, OPT_IN_RULES], ids=["main", "opt-in"])
def test_promtool_check_rules(rules: Path) -> None:
    done = _run(_promtool(), "check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(prometheus_rules(rules))} rules found" in done.stdout, done.stdout


@pytest.mark.parametrize("tests", [RULE_TESTS, OPT_IN_TESTS], ids=["main", "opt-in"])
def test_promtool_unit_tests_pass(tests: Path) -> None:
    done = _run(_promtool(), "test", "rules", str(tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_opt_in_no_events_alert_fires_and_stays_quiet_in_its_unit_tests() -> None:
    tests = load_yaml(OPT_IN_TESTS)
    assert tests["rule_files"] == [OPT_IN_RULES.name]
    checks = [c for case in tests["tests"] for c in case["alert_rule_test"]]
    assert {c["alertname"] for c in checks} == {"HydraCachixBridgeNoHydraEvents"}
    assert any(c.get("exp_alerts") for c in checks) and any(not c.get("exp_alerts") for c in checks)
    (rule,) = prometheus_rules(OPT_IN_RULES)
    assert 'source=~"hydra|hydra-db"' in rule["expr"] and "[6h]" in rule["expr"]
    # The window is set in one place.
    assert OPT_IN_RULES.read_text(encoding="utf-8").count("[6h]") == 2  # the expr and the sed


def test_unit_tests_make_every_alert_fire_and_stay_quiet() -> None:
    tests = load_yaml(RULE_TESTS)
    assert tests["rule_files"] == [RULES.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test") or []:
            expected = check.get("exp_alerts") or []
            (fired if expected else quiet).add(check["alertname"])
            for alert in expected:
                assert {"severity", "job"} <= set(alert["exp_labels"]), alert
                assert set(alert["exp_annotations"]) == set(ANNOTATIONS), alert
    names = {rule["alert"] for rule in prometheus_rules()}
    assert fired == names, f"never shown firing: {names - fired}"
    assert quiet == names, f"never shown quiet: {names - quiet}"


def test_rules_file_shape() -> None:
    (group,) = load_yaml(RULES)["groups"]
    assert group["name"] == GROUP
    names = [rule["alert"] for rule in prometheus_rules()]
    assert len(names) == len(set(names)), names
    assert all(name.startswith("HydraCachixBridge") for name in names), names
    for rule in prometheus_rules():
        assert "for" in rule, rule["alert"]
        _seconds(rule["for"])


@pytest.mark.parametrize("source", ["prometheus", "grafana"])
def test_every_rule_has_severity_summary_description_and_runbook(source: str) -> None:
    rules = prometheus_rules() if source == "prometheus" else grafana_rules()
    assert rules
    for rule in rules:
        name = rule.get("alert") or rule.get("title")
        assert rule["labels"]["severity"] in SEVERITIES, name
        for key in ANNOTATIONS:
            assert str(rule["annotations"].get(key) or "").strip(), f"{name}: no {key}"
        assert rule["annotations"]["runbook_url"] == RUNBOOK_BASE + github_anchor(str(name))


def test_every_runbook_anchor_is_a_heading_of_the_runbook() -> None:
    anchors = {github_anchor(heading) for heading in runbook_headings()}
    headings = set(runbook_headings())
    for rule in prometheus_rules() + grafana_rules() + prometheus_rules(OPT_IN_RULES):
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        assert url.split("#", 1)[1] in anchors, f"{url}: no such heading in {RUNBOOK.name}"
    for rule in prometheus_rules() + prometheus_rules(OPT_IN_RULES):
        assert rule["alert"] in headings, f"{rule['alert']}: no section in {RUNBOOK.name}"
    # Links inside the runbook point at its own headings too.
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text(encoding="utf-8"))
    assert set(links) <= anchors, set(links) - anchors


def test_github_anchor() -> None:
    assert github_anchor("HydraCachixBridgeDown") == "hydracachixbridgedown"
    assert github_anchor("Loading the rules") == "loading-the-rules"
    assert github_anchor("What's up, doc?") == "whats-up-doc"


def test_every_prometheus_alert_has_a_grafana_counterpart() -> None:
    prometheus = {rule["alert"]: rule for rule in prometheus_rules()}
    grafana = {rule["title"]: rule for rule in grafana_rules()}
    assert set(grafana) == set(prometheus)
    for name, rule in grafana.items():
        twin = prometheus[name]
        assert rule["labels"]["severity"] == twin["labels"]["severity"], name
        assert rule["annotations"]["runbook_url"] == twin["annotations"]["runbook_url"], name
        assert rule["annotations"]["summary"] == twin["annotations"]["summary"], name
        assert _seconds(rule["for"]) == _seconds(twin["for"]), name


def test_grafana_provisioning_shape() -> None:
    document = load_yaml(GRAFANA_RULES)
    assert document["apiVersion"] == 1
    (group,) = document["groups"]
    assert group["orgId"] == 1
    assert group["name"] == GROUP
    assert group["folder"] == "Nix"
    assert group["interval"] == "1m"
    uids = [rule["uid"] for rule in group["rules"]]
    assert len(uids) == len(set(uids)), uids
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid) for uid in uids), uids
    for rule in group["rules"]:
        name = rule["title"]
        assert rule["condition"] == "C", name
        data = {query["refId"]: query for query in rule["data"]}
        assert list(data) == ["A", "B", "C"], name
        assert data["A"]["datasourceUid"] not in ("", "__expr__"), name
        assert data["A"]["relativeTimeRange"] == {"from": 600, "to": 0}, name
        assert data["A"]["model"]["instant"] is True, name
        assert data["A"]["model"]["refId"] == "A", name
        assert data["B"]["datasourceUid"] == "__expr__", name
        assert data["B"]["model"]["type"] == "reduce", name
        assert data["B"]["model"]["reducer"] == "last", name
        assert data["B"]["model"]["expression"] == "A", name
        assert data["C"]["datasourceUid"] == "__expr__", name
        assert data["C"]["model"]["type"] == "threshold", name
        assert data["C"]["model"]["expression"] == "B", name
        (condition,) = data["C"]["model"]["conditions"]
        assert condition["evaluator"] == {"type": "gt", "params": [0]}, name
        assert rule["noDataState"] in ("NoData", "Alerting", "OK"), name
        assert rule["execErrState"] in ("Error", "Alerting", "OK"), name
        _seconds(rule["for"])
    # The Prometheus data source uid comes from one environment variable, which Grafana
    # expands in provisioning files.
    uids = {q["datasourceUid"] for r in group["rules"] for q in r["data"] if q["refId"] == "A"}
    assert uids == {"${" + DS_UID_VARIABLE + "}"}
    states = {rule["title"]: rule["noDataState"] for rule in group["rules"]}
    assert states["HydraCachixBridgeAbsent"] == "Alerting"
    # The data source uid is a placeholder users must change: the file says so.
    assert "data source" in GRAFANA_RULES.read_text(encoding="utf-8")


def test_grafana_queries_parse(tmp_path: Path) -> None:
    """Each Grafana query, wrapped in a throwaway rule, passes `promtool check rules`."""
    lines = ["groups:", "  - name: grafana-queries", "    rules:"]
    for index, rule in enumerate(grafana_rules()):
        expr = _grafana_query(rule)
        lines += [f"      - alert: Query{index}", "        expr: |"]
        lines += [f"          {line}" for line in expr.splitlines()]
    path = tmp_path / "grafana-queries.yaml"
    path.write_text("\n".join(lines) + "\n")
    done = _run(_promtool(), "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_expressions_cover_both_files() -> None:
    found = alert_expressions()
    names = [rule["alert"] for rule in prometheus_rules()]
    opt_in = [rule["alert"] for rule in prometheus_rules(OPT_IN_RULES)]
    grafana = [f"{name} (Grafana)" for name in names]
    assert [name for name, _ in found] == names + grafana + opt_in
    assert all(expr and "\n\n" not in expr for _, expr in found)


def test_every_metric_referenced_exists_in_the_registry() -> None:
    samples = registry_samples()
    used: set[str] = set()
    for name, expr in alert_expressions():
        for metric in METRIC_NAME.findall(expr):
            used.add(metric)
            assert metric in samples, f"{name}: {metric} is not exposed by a fresh bridge"
        for metric, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                known = {labels.get(label) for labels in samples[metric]} - {None}
                assert known, f"{name}: {metric} has no label {label}"
                if op in ("=", "=~") and re.fullmatch(r"[\w|]+", value):
                    assert set(value.split("|")) <= known, f"{name}: {label}={value!r}"
    assert "hydra_cachix_bridge_last_success_timestamp_seconds" not in used


def test_registry_samples_match_the_queue_states() -> None:
    samples = registry_samples()
    states = {labels["state"] for labels in samples["hydra_cachix_bridge_queue_items"]}
    assert states == set(ItemState)


MINI_SAMPLE = """\
# comment
groups:
  - name: g  # trailing comment
    rules:
      - alert: A
        expr: |
          sum(x{a="b"}) > 0
          and y
        for: 0m
        labels:
          severity: info
        annotations:
          summary: "quoted \\"text\\" # not a comment"
          url: 'single ''quoted'''
        params: [0]
        empty: []
        folded: >-
          one
          two
      - plain item
"""


def test_mini_yaml_reader() -> None:
    data = MiniYaml.load(MINI_SAMPLE)
    assert data == {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {
                        "alert": "A",
                        "expr": 'sum(x{a="b"}) > 0\nand y\n',
                        "for": "0m",
                        "labels": {"severity": "info"},
                        "annotations": {
                            "summary": 'quoted "text" # not a comment',
                            "url": "single 'quoted'",
                        },
                        "params": [0],
                        "empty": [],
                        "folded": "one two",
                    },
                    "plain item",
                ],
            }
        ]
    }
    if yaml is not None:
        assert yaml.safe_load(MINI_SAMPLE) == data
        for path in (RULES, RULE_TESTS, GRAFANA_RULES):
            text = path.read_text(encoding="utf-8")
            assert MiniYaml.load(text) == yaml.safe_load(text), path

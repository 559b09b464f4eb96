"""Structural checks of the Grafana dashboards and their provisioning provider.

No Grafana server is installable here (REFERENCE §7): every dashboard under
grafana/dashboards/ is checked by structure, and every metric it names must exist in
the bridge's real registry. dashboard_queries() hands the panel queries to the
integration test, which runs them against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from exporter.metrics import BridgeMetrics, HydraDbMetrics, QueueCollector

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
PROVISIONING_DIR = ROOT / "grafana" / "provisioning" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
PROVIDERS = sorted([*PROVISIONING_DIR.glob("*.yaml"), *PROVISIONING_DIR.glob("*.yml")])

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
# Panels that hold no query and therefore need neither a unit nor a target.
NO_QUERY_TYPES = {"row", "text"}

METRIC_RE = re.compile(r"hydra_cachix_bridge_[a-z_]+")
SELECTOR_RE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\{([^{}]*)\}")
MATCHER_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
RANGE_FUNCTION_RE = re.compile(r"\b(rate|irate|increase)\(")
RANGE_AT_END_RE = re.compile(r"\[([^\[\]]*)\]\s*$")

SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$instance": ".*",
    "$cache": ".*",
    "$job": ".*",
}


# -- helpers --------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    """Parse one dashboard file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a JSON object"
    return data


def panel_groups(dashboard: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """The top-level panels, then the panels folded inside each collapsed row.

    A collapsed row keeps its panels in its own "panels" list, laid out as if expanded,
    so each such list is its own grid for the overlap check.
    """
    top = dashboard.get("panels", [])
    yield top
    for panel in top:
        if panel.get("type") == "row" and panel.get("panels"):
            yield panel["panels"]


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    return [panel for group in panel_groups(dashboard) for panel in group]


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that carries queries."""
    return [p for p in all_panels(dashboard) if p.get("type") not in NO_QUERY_TYPES]


def find_keys(node: Any, key: str) -> bool:
    """Whether key appears anywhere in a JSON tree."""
    if isinstance(node, dict):
        return key in node or any(find_keys(value, key) for value in node.values())
    if isinstance(node, list):
        return any(find_keys(value, key) for value in node)
    return False


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Template variables by name."""
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


def variable_query(var: dict[str, Any]) -> str:
    """A query variable's query, in the plain string or the editor's object form."""
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    assert isinstance(query, str), f"variable {var.get('name')}: no query string"
    return query


def closing_paren(text: str, open_index: int) -> int:
    """Index of the parenthesis closing the one at open_index (quoted strings skipped)."""
    depth = 0
    quote = ""
    index = open_index
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def range_arguments(expr: str) -> list[tuple[str, str]]:
    """(function, range) of every rate()/irate()/increase() call in expr."""
    found = []
    for match in RANGE_FUNCTION_RE.finditer(expr):
        start = match.end() - 1
        argument = expr[start + 1 : closing_paren(expr, start)]
        at_end = RANGE_AT_END_RE.search(argument)
        found.append((match.group(1), at_end.group(1) if at_end else ""))
    return found


def registry_metrics() -> dict[str, set[str]]:
    """Every sample and family name of the real registry, with its label names."""
    registry = CollectorRegistry()
    caches = {"team": "cachix", "mirror": "nix-copy"}
    metrics = BridgeMetrics(
        registry,
        version="0.0.0-test",
        caches=caches,
    )
    # Gauges set only at run time (last_*, log_source_readable) have no children yet:
    # give every labelled metric one child so its sample names and labels show up.
    for attribute in vars(metrics).values():
        labelnames = getattr(attribute, "_labelnames", ())
        if labelnames:
            attribute.labels(*["x"] * len(labelnames))
    registry.register(
        QueueCollector(
            lambda: ({("team", "pending"): 1}, {"team": 0.0}),
            caches,
            lambda: 1.0,
        )
    )
    HydraDbMetrics(registry)  # registered when [hydra_db] is configured
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        names.setdefault(family.name, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
            names[family.name].update(sample.labels)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, runnable expr) for every target of every dashboard.

    $__rate_interval becomes 1m and $job/$instance/$cache become .*, so each query can
    be sent to a real Prometheus as is.
    """
    queries = []
    for path in DASHBOARDS:
        for panel in query_panels(load(path)):
            for target in panel.get("targets", []):
                expr = target.get("expr", "")
                for variable, value in SUBSTITUTIONS.items():
                    expr = expr.replace(variable, value)
                queries.append((panel.get("title", ""), expr))
    return queries


def provider_paths_plain(text: str) -> list[str]:
    """options.path of each provider, read without a YAML library."""
    return [
        match.group(1).strip("'\"")
        for match in re.finditer(r"^\s*path:\s*(\S+)\s*$", text, re.MULTILINE)
    ]


# -- dashboards -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_metrics() -> dict[str, set[str]]:
    """The registry's metric names and labels, built once."""
    return registry_metrics()


def test_there_are_dashboards() -> None:
    assert DASHBOARDS, f"no dashboards in {DASHBOARD_DIR}"


def test_dashboard_uids_are_unique() -> None:
    uids = [load(path).get("uid") for path in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids


@pytest.fixture(params=DASHBOARDS, ids=[path.name for path in DASHBOARDS])
def dashboard_path(request: pytest.FixtureRequest) -> Path:
    """Each dashboard file in turn."""
    path: Path = request.param
    return path


def test_dashboard_top_level(dashboard_path: Path) -> None:
    dashboard = load(dashboard_path)
    # Fixed uid (the file's name) so provisioning updates in place and links stay valid.
    assert dashboard.get("uid") == dashboard_path.stem
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard.get("title"), str) and dashboard["title"]
    assert isinstance(dashboard.get("schemaVersion"), int)
    assert dashboard.get("id") is None
    assert isinstance(dashboard.get("panels"), list) and dashboard["panels"]


def test_no_import_only_datasource_inputs(dashboard_path: Path) -> None:
    # The __inputs / ${DS_PROMETHEUS} export form breaks file provisioning.
    text = dashboard_path.read_text(encoding="utf-8")
    assert "${DS_" not in text
    assert not find_keys(load(dashboard_path), "__inputs")


def test_template_variables(dashboard_path: Path) -> None:
    found = variables(load(dashboard_path))
    datasource = found.get("datasource")
    assert datasource is not None, "no datasource variable"
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance"):
        assert name in found, f"no {name} variable"
        assert found[name]["type"] == "query"
        assert found[name].get("multi") is True
        assert found[name].get("includeAll") is True
    assert "label_values(" in variable_query(found["job"])
    assert 'job=~"$job"' in variable_query(found["instance"])
    if "cache" in found:
        query = variable_query(found["cache"])
        assert 'job=~"$job"' in query
        assert 'instance=~"$instance"' in query
    for var in found.values():
        if var["type"] == "query":
            assert var.get("datasource") == DATASOURCE, var["name"]
            assert METRIC_RE.search(variable_query(var)), var["name"]


def test_panel_ids_are_unique(dashboard_path: Path) -> None:
    ids = [panel.get("id") for panel in all_panels(load(dashboard_path))]
    assert all(isinstance(panel_id, int) for panel_id in ids), ids
    assert len(ids) == len(set(ids)), ids


def test_panels_fit_the_grid_without_overlap(dashboard_path: Path) -> None:
    for group in panel_groups(load(dashboard_path)):
        boxes = []
        for panel in group:
            grid = panel.get("gridPos")
            title = panel.get("title")
            assert isinstance(grid, dict), f"{title}: no gridPos"
            values = [grid.get(key) for key in ("x", "y", "w", "h")]
            x, y, w, h = (v if isinstance(v, int) else -1 for v in values)
            assert min(x, y, w, h) >= 0, f"{title}: {grid} needs integer x, y, w and h"
            assert x >= 0 and y >= 0 and w > 0 and h > 0, f"{title}: {grid}"
            assert x + w <= GRID_COLUMNS, f"{title}: {grid} is wider than the grid"
            boxes.append((title, x, y, w, h))
        for index, (title_a, xa, ya, wa, ha) in enumerate(boxes):
            for title_b, xb, yb, wb, hb in boxes[index + 1 :]:
                overlap = xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha
                assert not overlap, f"panels {title_a!r} and {title_b!r} overlap"


def test_panels_have_units_datasource_and_targets(dashboard_path: Path) -> None:
    for panel in all_panels(load(dashboard_path)):
        title = panel.get("title")
        if panel.get("type") == "text":
            continue
        if panel.get("type") == "row":
            assert panel.get("datasource", DATASOURCE) == DATASOURCE, title
            continue
        assert panel.get("datasource") == DATASOURCE, title
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert isinstance(unit, str) and unit, f"{title}: no unit"
        targets = panel.get("targets")
        assert targets, f"{title}: no targets"
        ref_ids = [target.get("refId") for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: {ref_ids}"
        for target in targets:
            assert target.get("datasource") == DATASOURCE, title
            assert isinstance(target.get("expr"), str), title
            assert target["expr"].strip(), f"{title}: empty expr"


def test_rate_ranges_use_rate_interval(dashboard_path: Path) -> None:
    for panel in query_panels(load(dashboard_path)):
        for target in panel["targets"]:
            for function, window in range_arguments(target["expr"]):
                assert window == "$__rate_interval", (
                    f"{panel['title']}: {function}() over [{window}] in {target['expr']}"
                )


def test_selectors_filter_job_instance_and_cache(
    dashboard_path: Path, real_metrics: dict[str, set[str]]
) -> None:
    for panel in query_panels(load(dashboard_path)):
        for target in panel["targets"]:
            expr = target["expr"]
            where = f"{panel['title']}: {expr}"
            # Every bridge metric is selected with braces, i.e. with its filters.
            for match in METRIC_RE.finditer(expr):
                assert expr[match.end() : match.end() + 1] == "{", where
            selectors = list(SELECTOR_RE.finditer(expr))
            assert selectors, where
            for selector in selectors:
                name = selector.group(1)
                assert name, f"{where}: selector without a metric name"
                matchers = {
                    label: (op, value) for label, op, value in MATCHER_RE.findall(selector[2])
                }
                assert matchers.get("job") == ("=~", "$job"), where
                assert matchers.get("instance") == ("=~", "$instance"), where
                if name == "up":
                    continue
                labels = real_metrics.get(name, set())
                if "cache" in labels:
                    assert matchers.get("cache") == ("=~", "$cache"), where
                else:
                    assert "cache" not in matchers, f"{where}: {name} has no cache label"
                for label in matchers.keys() - {"job", "instance"}:
                    assert label in labels, f"{where}: {name} has no {label} label"


def test_metric_names_exist_in_registry(
    dashboard_path: Path, real_metrics: dict[str, set[str]]
) -> None:
    dashboard = load(dashboard_path)
    texts = [target["expr"] for p in query_panels(dashboard) for target in p["targets"]]
    texts += [
        variable_query(var) for var in variables(dashboard).values() if var["type"] == "query"
    ]
    referenced = {name for text in texts for name in METRIC_RE.findall(text)}
    assert referenced
    unknown = sorted(referenced - real_metrics.keys())
    assert not unknown, f"not in the registry: {unknown}"


def test_registry_helper_sees_histograms_and_info(real_metrics: dict[str, set[str]]) -> None:
    # Guards the helper itself: sample names, not only family names, are collected.
    for name in (
        "hydra_cachix_bridge_build_info",
        "hydra_cachix_bridge_paths_pushed_total",
        "hydra_cachix_bridge_push_duration_seconds_bucket",
        "hydra_cachix_bridge_queue_items",
        "hydra_cachix_bridge_last_success_timestamp_seconds",
    ):
        assert name in real_metrics, name
    assert "cache" in real_metrics["hydra_cachix_bridge_last_success_timestamp_seconds"]
    assert "cache" not in real_metrics["hydra_cachix_bridge_events_received_total"]


def test_range_argument_parser() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(m_bucket{a="("}[$__rate_interval])))'
        " / increase(n[5m]) + irate(o[1m:10s])"
    )
    assert range_arguments(expr) == [
        ("rate", "$__rate_interval"),
        ("increase", "5m"),
        ("irate", "1m:10s"),
    ]


def test_dashboard_queries_are_runnable_text() -> None:
    queries = dashboard_queries()
    assert queries
    for title, expr in queries:
        assert title, expr
        assert "$" not in expr, f"{title}: unsubstituted variable in {expr}"


def test_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: the test command installs Debian's prometheus")
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": expr}
                    for index, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    # JSON is valid YAML, so no YAML library is needed to write the rules file.
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- provisioning ---------------------------------------------------------------------------


def test_there_is_a_provider() -> None:
    assert PROVIDERS, f"no provider YAML in {PROVISIONING_DIR}"


@pytest.mark.parametrize("provider", PROVIDERS, ids=[path.name for path in PROVIDERS])
def test_provider_points_at_dashboard_folder(provider: Path) -> None:
    text = provider.read_text(encoding="utf-8")
    assert re.search(r"^apiVersion:\s*1\s*$", text, re.MULTILINE)
    assert re.search(r"^providers:\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*(-\s+)?type:\s*file\s*$", text, re.MULTILINE)
    paths = provider_paths_plain(text)
    try:
        import yaml  # type: ignore[import-untyped]  # optional: not a dependency
    except ImportError:
        yaml = None
    if yaml is not None:
        data = yaml.safe_load(text)
        assert data["apiVersion"] == 1
        assert all(entry["type"] == "file" for entry in data["providers"])
        assert [entry["options"]["path"] for entry in data["providers"]] == paths
    assert paths
    stems = {path.stem for path in DASHBOARDS}
    for path in paths:
        assert path.startswith("/"), path
        # The folder is named after the dashboard file(s) copied or symlinked into it.
        assert Path(path).name in stems, f"{path}: no grafana/dashboards/{Path(path).name}.json"

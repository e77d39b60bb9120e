"""The shipped Grafana dashboard stays consistent with the metrics the gateway exports.

Every metric a query names must exist in app/ops/metrics.py with the labels the query uses, every
panel must read from the ``$datasource`` variable, and the layout must be a valid 24-column grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from app.ops import metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "anthropic-gateway.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

METRIC_RE = re.compile(r"gateway_[a-z_]+")
SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_created")
SELECTOR_RE = re.compile(r"(gateway_[a-z_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")


def exported_metrics() -> dict[str, set[str]]:
    """Name as a query writes it (before any _bucket/_count/_sum suffix) -> its labels.

    ``describe()`` gives the family name, which for a counter lacks the ``_total`` that the
    exposition (and so PromQL) uses; histograms are queried through ``_bucket`` etc., which
    carry ``le`` as well.
    """
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames)
        for family in obj.describe():
            if family.type == "counter":
                out[family.name + "_total"] = labels
            elif family.type == "histogram":
                out[family.name] = labels | {"le"}
            else:
                out[family.name] = labels
    return out


EXPORTED = exported_metrics()


def base_name(name: str) -> str:
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def exprs() -> list[str]:
    found = [
        target["expr"]
        for panel in all_panels(load()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert found, "the dashboard has no queries"
    return found


def closing_paren(text: str, start: int) -> int:
    """Index of the ')' that closes the '(' at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def opening_paren(text: str, end: int) -> int:
    """Index of the '(' that opens the ')' at ``end``."""
    depth = 0
    for i in range(end, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def grouping_scope(expr: str, match: re.Match[str]) -> str:
    """The sub-expression a ``by (...)``-style clause groups over.

    ``sum by (x) (inner)`` groups ``inner``; ``sum(inner) by (x)`` groups the parenthesised
    argument before the clause; ``a / on (x) b`` (binary matching) takes the whole expression.
    """
    if match.group(1) in ("on", "ignoring"):
        return expr
    after = match.end()
    while after < len(expr) and expr[after].isspace():
        after += 1
    if after < len(expr) and expr[after] == "(":
        return expr[after : closing_paren(expr, after) + 1]
    before = match.start() - 1
    while before >= 0 and expr[before].isspace():
        before -= 1
    assert before >= 0 and expr[before] == ")", f"cannot tell what {match.group(0)!r} groups"
    return expr[opening_paren(expr, before) : before + 1]


def test_dashboard_is_valid_json_with_the_expected_identity() -> None:
    dash = load()
    assert dash["uid"] == "anthropic-gateway"
    assert dash["title"] == "Anthropic gateway"
    assert dash["schemaVersion"] >= 36
    assert dash["refresh"] == "30s"
    assert dash["time"] == {"from": "now-6h", "to": "now"}


def test_the_code_exports_the_metrics_this_test_knows() -> None:
    # Guards the name mangling in exported_metrics(): if it broke, every check below would.
    assert EXPORTED["gateway_requests_total"] == {"route", "backend", "status", "stream"}
    assert EXPORTED["gateway_request_duration_seconds"] == {"route", "stream", "le"}
    assert EXPORTED["gateway_streams_in_flight"] == {"backend"}


@pytest.mark.parametrize("expr", exprs())
def test_every_metric_in_a_query_is_exported(expr: str) -> None:
    names = {base_name(name) for name in METRIC_RE.findall(expr)}
    assert names, f"query names no gateway metric: {expr}"
    unknown = names - EXPORTED.keys()
    assert not unknown, f"{sorted(unknown)} not in app/ops/metrics.py (query: {expr})"


@pytest.mark.parametrize("expr", exprs())
def test_label_matchers_use_labels_of_their_metric(expr: str) -> None:
    for selector in SELECTOR_RE.finditer(expr):
        metric = selector.group(1)
        labels = EXPORTED.get(base_name(metric), set())
        if metric.endswith(("_count", "_sum")):
            labels = labels - {"le"}
        used = set(MATCHER_RE.findall(selector.group(2)))
        assert used <= labels, f"{metric} has no label(s) {sorted(used - labels)}: {expr}"
        for label, variable in (("route", "$route"), ("backend", "$backend")):
            if label in labels:
                assert f'{label}=~"{variable}"' in selector.group(2), (
                    f'{metric} is not filtered by {label}=~"{variable}": {expr}'
                )


@pytest.mark.parametrize("expr", exprs())
def test_grouping_labels_belong_to_every_grouped_metric(expr: str) -> None:
    for clause in GROUPING_RE.finditer(expr):
        grouped = {label.strip() for label in clause.group(2).split(",") if label.strip()}
        scope = grouping_scope(expr, clause)
        names = {base_name(name) for name in METRIC_RE.findall(scope)}
        assert names, f"{clause.group(0)!r} groups no gateway metric: {expr}"
        for name in names:
            labels = EXPORTED.get(name, set())
            if f"{name}_bucket" not in scope:
                labels = labels - {"le"}  # only the _bucket series carry le
            missing = grouped - labels
            assert not missing, f"{name} has no label(s) {sorted(missing)}: {expr}"


@pytest.mark.parametrize("expr", exprs())
def test_rates_use_the_rate_interval(expr: str) -> None:
    for window in re.findall(r"\[([^\]]*)\]", expr):
        assert window == "$__rate_interval", f"range [{window}] in {expr}"


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in all_panels(load()["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(load()["panels"]):
        pos = panel["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0, panel["title"]
        assert x + w <= 24, f"{panel['title']} is wider than the 24-column grid"
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.setdefault((cx, cy), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    for panel in all_panels(load()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no queries"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "backend"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE
        assert var["multi"] is True and var["includeAll"] is True
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query == f"label_values(gateway_requests_total, {name})"
        assert name in EXPORTED["gateway_requests_total"]

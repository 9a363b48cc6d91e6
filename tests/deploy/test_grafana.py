"""The Grafana dashboard and its provisioning: valid, and pointing at each other and at the compose stack."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import COMPOSE_FILE, DASHBOARD, GRAFANA, PROMETHEUS_CONFIG, ROOT


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            found += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return found


LEARNING_ROW = "Learning from traffic"  # its panels need a gateway that learns (test_prometheus_dashboard)


def dashboard_exprs_by_row(dashboard: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """``dashboard_exprs`` grouped by the row each panel sits under (by position; "" before the first row)."""
    rows: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = panel["title"]
        for p in [panel, *panel.get("panels", [])]:
            rows.setdefault(current, []).extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return rows


def test_rows_hold_every_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = dashboard_exprs_by_row(dashboard)
    assert sorted(e for exprs in rows.values() for e in exprs) == sorted(dashboard_exprs(dashboard))
    assert any(title.startswith(LEARNING_ROW) for title in rows)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> repository path of a service's bind mounts (from the unresolved compose file)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            found[target] = source
    return found


def test_dashboard_is_valid_and_complete(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "probe-router" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["expr"].strip() and target["refId"]
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard))
    for metric in ("router_requests_total", "router_cost_usd_total", "router_reference_cost_usd_total",
                   "router_predicted_success_sum", "router_feedback_score_total", "router_feedback_total",
                   "router_scorer_seconds_bucket", "router_scorer_queue_seconds_bucket", "router_scorer_batch_size",
                   "router_upstream_seconds_bucket", "router_time_to_first_token_seconds_bucket",
                   "router_upstream_errors_total", "router_scorer_errors_total", "router_requests_in_flight",
                   "router_backend_up", "router_prompt_tokens_total", "router_completion_tokens_total"):
        assert metric in exprs, f"no panel shows {metric}"
    assert exprs.count("histogram_quantile(") >= 8


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioned = [ds for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
                   for ds in yaml.safe_load(f.read_text())["datasources"]]
    uids = {ds["uid"]: ds for ds in provisioned}
    refs = [p["datasource"] for p in dashboard["panels"] if "datasource" in p]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref["uid"] in uids, f"datasource {ref} is not provisioned"
        assert uids[ref["uid"]]["type"] == ref["type"] == "prometheus"


def test_datasource_points_at_the_compose_prometheus(compose: dict[str, Any]) -> None:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]
    prometheus_mounts = mounts(compose["services"]["prometheus"])
    assert ROOT / prometheus_mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG


def test_dashboard_provider_loads_the_mounted_dashboard_folder(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    grafana_mounts = mounts(grafana)
    provisioning = ROOT / grafana_mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "probe-router.yml").read_text())["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert ROOT / grafana_mounts[folder] == DASHBOARD.parent
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(folder) and (DASHBOARD.parent / home.name).is_file()


def test_dashboard_jobs_exist_in_the_scrape_config(dashboard: dict[str, Any]) -> None:
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    for title, expr in dashboard_exprs(dashboard):
        for job in ("probe-router", "vllm"):
            if f'job="{job}"' in expr:
                assert job in jobs, f"{title}: {expr} names job {job}, which Prometheus does not scrape"


def test_dashboard_vllm_metrics_exist_in_vllm(dashboard: dict[str, Any]) -> None:
    """The vLLM metric names the dashboard reads are the ones vLLM exports (checked in `make setup`'s vLLM)."""
    packages = sorted((ROOT / ".venv-vllm" / "lib").glob("python3*/site-packages/vllm"))
    if not packages:
        pytest.skip("vLLM is not installed in .venv-vllm (make setup installs it)")
    source = " ".join(f.read_text(errors="replace") for f in (packages[0] / "v1" / "metrics").rglob("*.py"))
    names = {m.removesuffix("_total") for _, e in dashboard_exprs(dashboard) for m in re.findall(r"vllm:[a-z_]+", e)}
    assert names
    for name in sorted(names):
        assert f'"{name}"' in source, f"vLLM exports no metric {name}"

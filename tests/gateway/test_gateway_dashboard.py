"""The Grafana dashboard charts only metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sovereign-gateway.json"


def test_dashboard_queries_name_exported_metrics(gw):
    c = gw.client(gw.key(requests_per_minute=1))
    c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    exported = set(re.findall(r"^(sovereign_gateway_\w+?)(?:\{| )", httpx.get(f"{gw.url}/metrics").text, re.M))
    dash = json.loads(DASHBOARD.read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"sovereign_gateway_\w+", t["expr"])}
    assert used and used <= exported | {"sovereign_gateway_quota_rejections_total",
                                        "sovereign_gateway_upstream_errors_total",
                                        "sovereign_gateway_policy_events_total"}, used - exported
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])

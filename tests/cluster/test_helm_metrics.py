"""The chart's metrics options: scrape annotations by default; a ServiceMonitor (with a PodMonitor
for the partition servers) and a Grafana dashboard ConfigMap only when asked."""

from __future__ import annotations

import json

from tests.support.chart import objects, render


def _kinds(objs):
    return sorted(o["kind"] for o in objs)


def test_operator_pod_is_annotated_for_scraping_and_serves_metrics():
    (dep,) = [o for o in objects(render()) if o["kind"] == "Deployment"]
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8081",
                                              "prometheus.io/path": "/metrics"}
    container = pod["spec"]["containers"][0]
    assert "--metrics-port=8081" in container["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    (dep,) = [o for o in objects(render({"metrics": {"annotations": False, "port": 9100},
                                         "podAnnotations": {"a": "b"}})) if o["kind"] == "Deployment"]
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert "--metrics-port=9100" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_service_monitor_and_dashboard_render_only_when_enabled():
    default = _kinds(objects(render()))
    assert not {"ServiceMonitor", "PodMonitor"} & set(default)
    assert "ConfigMap" not in default
    objs = objects(render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}}))
    (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    (pods,) = [o for o in objs if o["kind"] == "PodMonitor"]
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics"))
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    assert "ConfigMap" not in _kinds(objs)
    objs = objects(render({"metrics": {"dashboard": {"enabled": True}}}))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["mpnn.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in ("mpnn_training_steps_total", "mpnn_pass_phase_seconds_bucket", "mpnn_inference_requests_total",
                 "mpnn_networks_degraded", "mpnn_process_resident_memory_bytes"):
        assert name in exprs
    assert "ServiceMonitor" not in _kinds(objs)

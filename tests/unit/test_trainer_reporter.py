"""status.training as ``mpnn train`` reports it (the TrainingReporter), without a cluster."""

from __future__ import annotations

from tests.support.reporting import reports_of_a_run


def test_reporter_writes_status_training():
    patches = reports_of_a_run("r7")
    assert [p["training"]["phase"] for p in patches] == ["Running", "Running", "Succeeded", "Failed"]
    assert all(p["training"]["run"] == "r7" for p in patches)
    assert patches[1]["training"] == {"run": "r7", "phase": "Running", "epoch": 2, "step": 40, "loss": 0.25,
                                      "checkpoint": 5, "accuracy": 0.9}
    assert patches[2]["training"]["accuracy"] == 0.95 and patches[2]["training"]["completionTime"]
    assert patches[3]["training"]["message"] == "partition 1 unavailable"

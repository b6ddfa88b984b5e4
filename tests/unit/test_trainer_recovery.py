"""What the trainer reports into status.training while it recovers from a partition failure."""

from __future__ import annotations

from partition_server.client.trainer import TrainingReporter


def test_recovery_reports_the_wait_then_counts_the_restart():
    sent = []
    reporter = TrainingReporter(sent.append, "run-1")
    reporter.recovery({"event": "unavailable", "error": "partition 2 (digits-2...:50051) RunPass: UNAVAILABLE: gone",
                       "step": 84, "restarts": 1, "wait_seconds": 300.0})
    reporter.recovery({"event": "resumed", "step": 80, "lost_steps": 5, "seconds": 12.5, "restarts": 1,
                       "checkpoint": 9})
    waiting, resumed = (s["training"] for s in sent)
    assert waiting["phase"] == "Running" and "restarts" not in waiting
    assert waiting["message"].startswith("step 85 failed: partition 2 (digits-2")
    assert "waiting up to 300 s for every partition" in waiting["message"]
    assert resumed == {"run": "run-1", "phase": "Running", "restarts": 1, "step": 80, "checkpoint": 9, "message": None}

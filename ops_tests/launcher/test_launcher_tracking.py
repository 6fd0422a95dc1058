"""Training never fails because tracking does: the metric logger against a real `mlflow server` that is
killed mid-run keeps what it could not send, and delivers all of it once a server is back on the store,
with the failed flushes reported as `tracking_errors`."""
from __future__ import annotations

import pytest

from launcher.tracking_server import MlflowServer
from ray_head import free_port


@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(tmp_path):
    from mlflow.tracking import MlflowClient

    from launcher.tracking import MetricLogger, probe

    server = MlflowServer(tmp_path, "127.0.0.1", free_port()).start()
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        spill = tmp_path / "unsent.json"
        logger = MetricLogger(server.uri, run_id, flush_every=1, spill=spill)
        for step in range(3):
            logger.log(step, {"loss": 10.0 - step})
        assert logger.errors == 0
        server.stop()
        for step in range(3, 6):  # the server is gone: every flush fails, nothing raises, nothing is lost
            logger.log(step, {"loss": 10.0 - step})
        assert logger.errors == 3
        server.start()  # back, on the same store
        probe(server.uri, 5.0)
        logger.log(6, {"loss": 4.0})
        assert logger.errors == 3 and logger.dropped == 0
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert history == [(s, 10.0 - s) for s in range(7)]
        assert [m.value for m in client.get_metric_history(run_id, "tracking_errors")] == [3]  # the newest count only
        assert not spill.exists()

        # Down again, and this logger's process dies with a metric unsent: the next attempt's logger sends it.
        server.stop()
        logger.log(7, {"loss": 3.0})
        assert spill.is_file()
        del logger
        server.start()
        successor = MetricLogger(server.uri, run_id, flush_every=1, spill=spill)
        successor.log(8, {"loss": 2.0})
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert history == [(s, 10.0 - s) for s in range(9)]
        assert [m.value for m in client.get_metric_history(run_id, "tracking_errors")] == [3, 4]
        assert not spill.exists()
    finally:
        server.stop()

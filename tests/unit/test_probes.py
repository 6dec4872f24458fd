"""The metrics HTTP endpoint's probes: /healthz and /readyz next to /metrics."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodes.metrics import NodeMetrics, Probes, serve_metrics


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


class LoopThread:
    """An event loop running in its own thread, as the node's loop runs beside the HTTP threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def running() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.stop()
    if not running.loop.is_closed():
        running.loop.close()


def test_readyz_follows_the_serving_status_and_healthz_only_needs_the_loop(running: LoopThread) -> None:
    serving = [False]
    metrics = NodeMetrics("n", "enterprise")
    port = serve_metrics(metrics.registry, "127.0.0.1:0", Probes(lambda: serving[0], running.loop))
    assert get(port, "/readyz") == (503, "NOT_SERVING\n")
    assert get(port, "/healthz") == (200, "alive\n")
    serving[0] = True
    assert get(port, "/readyz") == (200, "SERVING\n")
    assert get(port, "/healthz") == (200, "alive\n")
    status, text = get(port, "/metrics")
    families = {f.name for f in text_string_to_metric_families(text)}
    assert status == 200 and "idis_node_info" in families


def test_both_probes_fail_when_the_event_loop_does_not_answer(running: LoopThread) -> None:
    metrics = NodeMetrics("n", "enterprise")
    port = serve_metrics(metrics.registry, "127.0.0.1:0", Probes(lambda: True, running.loop, timeout=0.2))
    assert get(port, "/readyz")[0] == 200
    running.stop()  # a loop that no longer turns: a wedged node
    for path in ("/healthz", "/readyz"):
        status, text = get(port, path)
        assert status == 503 and "event loop did not answer" in text
    running.loop.close()  # the node is gone
    assert get(port, "/healthz")[0] == 503
    assert get(port, "/metrics")[0] == 200  # scrapes never depend on the loop


def test_without_probes_every_path_serves_metrics() -> None:
    metrics = NodeMetrics("n", "enterprise")
    port = serve_metrics(metrics.registry, "127.0.0.1:0")
    status, text = get(port, "/readyz")
    assert status == 200 and "idis_node_info" in {f.name for f in text_string_to_metric_families(text)}

"""Prometheus text metrics over a stdlib HTTP server thread (no extra dependency)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters the server increments; gauges are read at scrape time from `gauges` callables."""

    COUNTERS = {
        "steps_received": "robot steps accepted and queued for logging",
        "steps_refused": "robot steps refused for any reason (invalid, writer queue full, store not writable); "
        "the robot was told",
        "steps_refused_queue_full": "robot steps refused because the episode writer queue was full",
        "steps_refused_store": "robot steps refused because the episode store could not be written",
        "seq_gaps": "robot messages whose seq skipped some (the robot dropped messages it could not keep)",
        "labels_corrected": "steps claiming an intervention the server did not assign, logged as robot steps",
        "teleop_actions": "operator actions forwarded to robots",
        "teleop_actions_refused": "operator actions refused (not assigned, e-stop, malformed)",
        "takeovers": "operator takeovers started",
        "teleop_input_stopped": "robots told to hold because their operator's input stopped (teleop watchdog)",
    }

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.gauges = gauges
        self.step_latency = Histogram()

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def observe_step_latency(self, seconds: float) -> None:
        with self._lock:
            self.step_latency.observe(seconds)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, help_text in self.COUNTERS.items():
                lines += [
                    f"# HELP flotilla_{name}_total {help_text}",
                    f"# TYPE flotilla_{name}_total counter",
                    f"flotilla_{name}_total {self.counters[name]}",
                ]
            hist = "flotilla_step_command_latency_seconds"
            lines += [
                f"# HELP {hist} time from receiving a robot step to sending its ack command",
                f"# TYPE {hist} histogram",
                *self.step_latency.lines(hist),
            ]
        for name, (help_text, read) in self.gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [
                f"# HELP flotilla_{name} {help_text}",
                f"# TYPE flotilla_{name} {kind}",
                f"flotilla_{name} {read()}",
            ]
        return "\n".join(lines) + "\n"


class MetricsHttpServer:
    """GET /metrics on (host, port) in a daemon thread; port 0 lets the OS choose (see `.port`)."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

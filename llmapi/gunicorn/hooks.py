"""gunicorn's hooks' helpers: the JSON logger, the metrics directory, the warm-up, a worker's connection metrics."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger
from prometheus_client import multiprocess

from llmapi.logs import JsonFormatter, iso_time
from llmapi.metrics import EXTENSION as METRICS_EXTENSION
from llmapi.runtime.service import EXTENSION as ENGINE_EXTENSION

METRICS_DIR_PREFIX = "llmapi-metrics-"


class JsonLogger(Logger):
    """gunicorn's logger with LOG_FORMAT=json: the error log and the access log as one JSON object a line."""

    def setup(self, cfg: Any) -> None:
        """Set gunicorn's handlers up, then make the error log JSON (access lines are built in access())."""
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """Log one request as JSON, with its id; the query string is left out (keys never belong in URLs)."""
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        entry = {
            "time": iso_time(time.time()),
            "level": "info",
            "logger": "gunicorn.access",
            "pid": os.getpid(),
            "request_id": atoms.get("{x-request-id}o"),
            "remote": atoms["h"],
            "method": atoms["m"],
            "path": atoms["U"],
            "status": int(atoms["s"]) if str(atoms["s"]).isdigit() else atoms["s"],
            "bytes": atoms["B"],
            "duration_ms": atoms["M"],
            "user_agent": atoms["a"],
        }
        self.access_log.info(json.dumps(entry, ensure_ascii=False))


def prepare_metrics_dir(configured: str) -> tuple[Path, bool]:
    """Return an empty directory for prometheus_client's files, and whether we made it (and so remove it)."""
    if not configured:
        return Path(tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)), True
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # left by an earlier run: counters would start from its values
        stale.unlink()
    return path, False


def mark_worker_dead(pid: int, path: Path) -> None:
    """Drop a dead worker's live gauges (in flight, capacity, models loaded); its counters stay summed."""
    multiprocess.mark_process_dead(pid, str(path))


def remove_metrics_dir(path: Path) -> None:
    """Remove the directory made by prepare_metrics_dir."""
    shutil.rmtree(path, ignore_errors=True)


def warm_up(app: Any) -> None:
    """Start loading the worker's model in the background (WARMUP=true)."""
    app.extensions[ENGINE_EXTENSION].warm()


class ConnectionMetrics:
    """A worker's open connections by state, and the connections its main loop refused, in the app's metrics."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.shown: tuple[int, ...] = ()

    def registry(self) -> Any:
        """The app's metrics, once gunicorn has loaded the app in this worker (None before)."""
        return getattr(getattr(self.worker, "wsgi", None), "extensions", {}).get(METRICS_EXTENSION)

    def show(self, reading: int, idle: int, closing: int, total: int) -> None:
        """Set the gauges of open connections by state (when they changed)."""
        counts = (reading, idle, closing, total)
        if counts != self.shown and (metrics := self.registry()) is not None:
            self.shown = counts
            for state, count in ("reading", reading), ("idle", idle), ("closing", closing):
                metrics.connections.labels(state).set(count)
            metrics.connections.labels("active").set(total - reading - idle - closing)

    def count(self, event: str) -> None:
        """Count a connection refused by the main loop (by reason), or the worker reaching MAX_CONNECTIONS."""
        if (metrics := self.registry()) is None:
            return
        if event == "limit":
            metrics.connection_limit_reached.inc()
        else:
            metrics.connections_refused.labels(event).inc()

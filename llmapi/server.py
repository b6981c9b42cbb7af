"""The gunicorn side, used by gunicorn.conf.py: a worker that stops cleanly, JSON logs, the metrics directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker
from prometheus_client import multiprocess

from llmapi.logs import JsonFormatter, iso_time
from llmapi.service import EXTENSION as ENGINE_EXTENSION

METRICS_DIR_PREFIX = "llmapi-metrics-"


class ThreadWorker(GthreadWorker):
    """gthread, except that a stopping worker lets go of the listening sockets at once.

    gunicorn's master closes its copy of the listening socket on SIGTERM, but each worker keeps its
    own until it has finished its requests: meanwhile new connections wait unanswered in the kernel's
    backlog and are reset at the end. Closed at once by every process, the socket refuses them straight
    away, so a client or a proxy (nginx: proxy_next_upstream) can go elsewhere at once.
    """

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stop (or start) accepting; when stopping for good, close the listeners too."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()  # idempotent: gunicorn closes them again on its way out


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

"""Gunicorn settings for llmapi, read from the environment through llmapi.config (no torch here)."""

import faulthandler
import os
import sys

from llmapi.config import ConfigError, Settings
from llmapi.gunicorn import board, hooks, reading

try:
    _settings = Settings.from_env()
except ConfigError as exc:  # stop in the master, before any worker starts, with the reason
    sys.exit(f"llmapi: configuration error: {exc}")

# Server socket
bind = [_settings.bind]
backlog = 2048

# Worker processes
# gthread: each worker is one process with its own model copy and `threads` request threads; the
# engine's own thread does the decoding, so request threads mostly wait and can be plentiful.
# llmapi's gthread lets go of the listening socket as soon as it stops, so that new connections are
# refused at once during a graceful shutdown instead of waiting in the backlog (see llmapi/gunicorn/worker.py).
worker_class = "llmapi.gunicorn.worker.ThreadWorker"
workers = _settings.web_concurrency
threads = _settings.threads
# Each worker loads its model lazily on its first generate: nothing heavy may happen in the master.
preload_app = False
keepalive = 5
# Slow clients: the worker's main loop reads each request, and a thread only gets it once it is all there (at most
# REQUEST_READ_TIMEOUT after its first byte, else 408). Open connections per worker, reading or idle or served, are
# capped at MAX_CONNECTIONS: beyond it they wait in the kernel's listen backlog (`backlog`), costing a worker nothing.
worker_connections = _settings.max_connections

# Timeouts
# Let C = GENERATION_TIMEOUT_MAX_MS. The engine ends every generation at its deadline, at most C after
# the request reached it (time spent queued counts), and answers with the text so far, so no request
# holds a thread for longer than C plus the time to send its answer (plus the model load, for the
# requests that arrive while their worker loads it).
# - timeout: a gthread worker's heartbeat comes from its main loop, not from its request threads, so this
#   only catches a wedged process; it sits above C anyway, so that no generation could ever be taken for one.
# - graceful_timeout: on SIGTERM a worker stops accepting and finishes what it holds, at most C + 10 s.
# - Whatever stops us must wait longer: Docker's stop_grace_period and Kubernetes'
#   terminationGracePeriodSeconds above graceful_timeout (C + 15 s or more); nginx's proxy_read_timeout
#   (deploy/nginx) at C + 30 s, since a whole answer is only sent when its generation ends.
_generation_cap_s = _settings.timeout_max_ms / 1000
timeout = int(_generation_cap_s + 30)
graceful_timeout = int(_generation_cap_s + 10)

# Logging
# Access log on stdout, gunicorn's own on stderr, llmapi's on stdout (llmapi/logs.py): each request's line
# carries its X-Request-ID; the query string is left out, so that a key put in a URL by mistake stays out.
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms pid=%(p)s request_id=%({x-request-id}o)s'
logger_class = "llmapi.gunicorn.hooks.JsonLogger" if _settings.log_format == "json" else "gunicorn.glogging.Logger"

# Process naming
proc_name = "llmapi"
# gunicorn's control socket defaults to one path per user, which instances on one host would share.
control_socket_disable = True


# Metrics: the workers write prometheus_client's files in one directory, which /metrics sums up.
_metrics_dir = None
_made_metrics_dir = False


def on_starting(server):
    """Give the workers an empty metrics directory; they find it in PROMETHEUS_MULTIPROC_DIR."""
    global _metrics_dir, _made_metrics_dir
    _metrics_dir, _made_metrics_dir = hooks.prepare_metrics_dir(_settings.metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)  # inherited by every worker forked from now on
    server.log.info("metrics directory %s", _metrics_dir)
    # Shared memory where the workers post their open connections, for least-connections accept.
    board.make_connection_board()
    reading.configure_reading(timeout=_settings.request_read_timeout, max_body=_settings.max_body_bytes)


def child_exit(server, worker):
    """Forget a dead worker: its live gauges (so that /metrics counts only the workers that serve), its connections."""
    if _metrics_dir is not None:
        hooks.mark_worker_dead(worker.pid, _metrics_dir)
    board.forget_worker(worker.age, worker.pid)


def on_exit(server):
    """Remove the metrics directory if it was made for this run."""
    if _made_metrics_dir and _metrics_dir is not None:
        hooks.remove_metrics_dir(_metrics_dir)


def post_worker_init(worker):
    """With WARMUP=true, start loading this worker's model in the background (/health stays instant)."""
    if _settings.warmup:
        hooks.warm_up(worker.wsgi)


def post_fork(server, worker):
    """Log each worker's birth; its torch threads are set when it loads its model."""
    server.log.info("worker %s forked (torch threads %s)", worker.pid, _settings.torch_threads)


def worker_int(worker):
    """Dump every thread's stack on SIGINT/SIGQUIT, to see where a stuck worker is."""
    worker.log.info("worker %s interrupted; thread stacks follow", worker.pid)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def worker_abort(worker):
    """Dump stacks when the master aborts a worker (SIGABRT after a timeout)."""
    worker.log.warning("worker %s aborted (pid %s); thread stacks follow", worker.pid, os.getpid())
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

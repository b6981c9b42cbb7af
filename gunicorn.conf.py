"""Gunicorn settings for llmapi, read from the environment through llmapi.config (no torch here)."""

import faulthandler
import os
import sys

from llmapi.config import ConfigError, Settings

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
worker_class = "gthread"
workers = _settings.workers
threads = _settings.threads
# Each worker loads its model lazily on its first generate: nothing heavy may happen in the master.
preload_app = False
keepalive = 5

# Timeouts
# A gthread worker's heartbeat comes from its main loop, not from request threads, so `timeout`
# only catches a wedged process; it sits above the longest allowed generation anyway, and the
# grace period lets every in-flight generation (capped at GENERATION_TIMEOUT_MAX_MS) finish on SIGTERM.
_generation_cap_s = _settings.timeout_max_ms / 1000
timeout = int(_generation_cap_s + 30)
graceful_timeout = int(_generation_cap_s + 10)

# Logging
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms pid=%(p)s'

# Process naming
proc_name = "llmapi"
# gunicorn's control socket defaults to one path per user, which instances on one host would share.
control_socket_disable = True


def post_fork(server, worker):
    """Log each worker's birth; its torch threads are set when it loads its model."""
    server.log.info("worker %s forked (torch threads %s)", worker.pid, _settings.threads_per_worker)


def worker_int(worker):
    """Dump every thread's stack on SIGINT/SIGQUIT, to see where a stuck worker is."""
    worker.log.info("worker %s interrupted; thread stacks follow", worker.pid)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def worker_abort(worker):
    """Dump stacks when the master aborts a worker (SIGABRT after a timeout)."""
    worker.log.warning("worker %s aborted (pid %s); thread stacks follow", worker.pid, os.getpid())
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

"""Print what one replica costs in memory: a real gunicorn on loopback, every worker's model loaded.

    python deploy/replica_memory.py --model models/tiny-gpt2 [--workers 2] [--full-batches]

Starts `gunicorn -c gunicorn.conf.py wsgi:app` (the image's command) on a free loopback port, sends
generate requests until every worker has loaded its model (bounded in count), then prints each
process's resident memory (RSS), its proportional share (PSS, which splits pages that processes
share: torch's libraries, and the model's weights, which safetensors maps from the page cache) and
the replica's total, and stops the server. `--full-batches` first fills every worker's batch with
sequences near the context length, so that the peak (HWM) includes the largest KV cache.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
KEY = "memory-probe-key"


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """Rss and Pss (smaps_rollup) and peak RSS (VmHWM) of one process, in KiB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    lines += Path(f"/proc/{pid}/status").read_text().splitlines()
    figures = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss", "VmHWM"):
            figures[name] = int(rest.split()[0])
    return figures


def workers_of(pid: int) -> list[int]:
    """The pids of gunicorn's workers."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def has_torch(pid: int) -> bool:
    """Whether process `pid` has torch's library mapped, i.e. has loaded its model."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def load_every_worker(url: str, master: int, workers: int, *, max_requests: int = 200) -> list[int]:
    """Send generates (bounded in count) until each of `workers` workers has its model."""
    for _ in range(max_requests):
        pids = workers_of(master)
        if len(pids) == workers and all(has_torch(p) for p in pids):
            return pids
        body = {"prompt": "Artificial Intelligence is", "max_new_tokens": 32}
        requests.post(url + "/generate", json=body, headers={"x-api-key": KEY}, timeout=300).raise_for_status()
    raise SystemExit(f"not every worker loaded its model after {max_requests} requests")


def fill_batches(url: str, count: int) -> None:
    """Send `count` concurrent generates whose prompt and output nearly fill GPT-2's 1024 positions."""
    body = {"prompt": "Artificial Intelligence is " * 225, "max_new_tokens": 100, "temperature": 0}  # ~900 tokens
    headers = {"x-api-key": KEY}
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(requests.post, url + "/generate", json=body, headers=headers, timeout=600) for _ in range(count)
        ]
        for future in futures:
            future.result().raise_for_status()


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Poll /health until it answers, or give up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("gunicorn did not answer /health")


def main(argv: list[str] | None = None) -> int:
    """Measure one replica and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MODEL_NAME: a local model directory")
    parser.add_argument("--workers", type=int, default=0, help="WEB_CONCURRENCY (0: as the server chooses)")
    parser.add_argument("--full-batches", action="store_true", help="fill every batch (MAX_BATCH_SIZE) first")
    args = parser.parse_args(argv)
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "MODEL_NAME": args.model,
        "WEB_CONCURRENCY": str(args.workers),
        "BIND": f"127.0.0.1:{port}",
        "HF_HUB_OFFLINE": "1",
    }
    from llmapi.config import Settings

    settings = Settings.from_env(env)  # what the server will choose: its workers and rows per batch
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, process)
        pids = load_every_worker(url, process.pid, settings.web_concurrency)
        if args.full_batches:
            fill_batches(url, settings.max_batch_size * settings.web_concurrency)
        rows = [("master", process.pid), *(("worker", pid) for pid in pids)]
        print(f"model {args.model}, {settings.web_concurrency} worker(s), {settings.max_batch_size} rows each")
        print(f"{'process':8} {'pid':>8} {'RSS MiB':>9} {'PSS MiB':>9} {'HWM MiB':>9}")
        totals = dict.fromkeys(("Rss", "Pss", "VmHWM"), 0)
        for role, pid in [*rows, ("replica", None)]:
            figures = memory_kib(pid) if pid else totals
            print(f"{role:8} {pid or '':>8}", *(f"{figures[k] / 1024:>9.0f}" for k in totals))
            totals = {k: totals[k] + figures[k] for k in totals} if pid else totals
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

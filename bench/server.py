"""A real gunicorn for the benchmark, started with the project's own gunicorn.conf.py, and what its processes use."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> int:
    """GET `url` and return the status (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def post(url: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """POST JSON with the key and return (status, body)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", "x-api-key": KEY}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class Server:
    """A gunicorn process tree on loopback, its log and its start-up figures."""

    process: subprocess.Popen
    url: str
    log_path: Path
    health_s: float = 0.0

    def pids(self) -> list[int]:
        """The master and its workers."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [self.process.pid, *(int(pid) for pid in out.stdout.split())]

    def log(self) -> str:
        """Everything gunicorn has written."""
        return self.log_path.read_text(errors="replace")

    def load_seconds(self) -> list[float]:
        """Each worker's model load time, from the service's log line."""
        return [float(s) for s in re.findall(r"loaded model \S+ in ([0-9.]+)s", self.log())]

    def memory(self) -> dict[str, float]:
        """Resident memory of all the server's processes in MiB: RSS summed, and PSS (shared pages split)."""
        rss = pss = 0.0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
            except OSError:
                continue
        return {"rss_mib": round(rss, 1), "pss_mib": round(pss, 1), "processes": len(self.pids())}

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the master and its workers."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLOCK_TICKS

    def stop(self) -> None:
        """SIGTERM gunicorn and wait for it (SIGKILL after 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(model: str, env: dict[str, str], *, log_dir: Path | None = None, timeout: float = 60.0) -> Server:
    """Launch gunicorn -c gunicorn.conf.py on a free port and time it until /health answers 200."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS")}
    full_env = {
        **base,
        "API_KEY": KEY,
        "MODEL_NAME": model,
        "HF_HUB_OFFLINE": "1",
        **env,
        "BIND": f"127.0.0.1:{port}",
    }
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="llmapi-bench-"))
    log_path = log_dir / f"gunicorn-{port}.log"
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    launched = time.perf_counter()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    while get(server.url + "/health", timeout=1.0) != 200:
        if process.poll() is not None or time.perf_counter() - launched > timeout:
            server.stop()
            raise RuntimeError(f"gunicorn did not come up:\n{server.log()[-2000:]}")
        time.sleep(0.01)
    server.health_s = time.perf_counter() - launched
    return server


def warm(server: Server, body: dict[str, Any], workers: int, *, timeout: float = 120.0) -> dict[str, float]:
    """Send the first generate (timed: it loads a model), then load every worker's model with parallel requests."""
    started = time.perf_counter()
    status, answer = post(server.url + "/generate", body)
    first = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"first generate failed: {status} {answer}")
    deadline = time.perf_counter() + timeout
    with ThreadPoolExecutor(4 * workers) as pool:
        while len(server.load_seconds()) < workers and time.perf_counter() < deadline:
            list(pool.map(lambda _: post(server.url + "/generate", body), range(4 * workers)))
    loads = server.load_seconds()
    return {"first_generate_s": first, "model_load_s": max(loads) if loads else float("nan"), "loaded": len(loads)}

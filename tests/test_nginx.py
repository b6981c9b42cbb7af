"""Debian's nginx with deploy/nginx/llmapi.conf.template in front of two real gunicorn instances, on loopback."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import KEY, ROOT, Server, free_port, wait_for_health
from tests.ops_helpers import error_of

pytestmark = pytest.mark.slow

TEMPLATE = ROOT / "deploy" / "nginx" / "llmapi.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MAX_BODY = 4096
PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


def render(template: str, values: dict[str, str]) -> str:
    """Fill the ${NAME} placeholders of `values` as `envsubst '${NAME}...'` does; anything else stays."""
    assert set(values) <= set(PLACEHOLDER.findall(template))
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass
class Nginx:
    """A running nginx and where it logs."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """nginx's access log (its stdout) so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def servers(start_server, tiny_model) -> list[Server]:
    """Two gunicorn instances, one worker each, trusting one proxy hop."""
    env = {
        "MODEL_NAME": tiny_model,
        "WEB_CONCURRENCY": "1",
        "TRUSTED_PROXY_HOPS": "1",
        "MAX_BODY_BYTES": str(MAX_BODY),
        "MAX_PROMPT_CHARS": "1000",
    }
    started = [start_server(wait=False, **env) for _ in range(2)]
    for server in started:
        wait_for_health(server.url, server.process)
    return started


@pytest.fixture
def nginx(servers: list[Server], tmp_path: Path) -> Iterator[Nginx]:
    """nginx from the template, in front of `servers`, with its own prefix; always stopped."""
    if not Path(NGINX).exists():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: .ci/run installs Debian's nginx package")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    port = free_port()
    upstreams = " ".join(f"server {s.url.removeprefix('http://')};" for s in servers)
    values = {
        "LLMAPI_UPSTREAMS": upstreams,
        "NGINX_LISTEN": f"127.0.0.1:{port}",
        "MAX_BODY_BYTES": str(MAX_BODY),
        "NGINX_PROXY_TIMEOUT": "150s",
        "REQUEST_READ_TIMEOUT": "10",
    }
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "llmapi.conf").write_text(render(TEMPLATE.read_text(), values))
    (prefix / "nginx.conf").write_text(main_config(prefix))
    log_path = prefix / "stdout.log"
    cmd = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    with log_path.open("wb") as out:
        process = subprocess.Popen([*cmd, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
    running = Nginx(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_health(running.url, process, timeout=15)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main_config(prefix: Path) -> str:
    """The nginx.conf around the rendered template: everything in the test's own directory."""
    user = "user root;" if os.geteuid() == 0 else ""  # as root, nginx's workers would otherwise be nobody
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in kinds)
    return f"""{user}
worker_processes 1;
pid {prefix / "nginx.pid"};
events {{ worker_connections 256; }}
http {{
{temps}
    include {prefix / "llmapi.conf"};
}}
"""


def post(url: str, body: dict, **headers: str) -> requests.Response:
    """POST JSON with the key."""
    return requests.post(url + "/generate", json=body, headers={"x-api-key": KEY, **headers}, timeout=120)


def lines_with(log: str, request_id: str) -> list[str]:
    """The log lines that name `request_id`."""
    return [line for line in log.splitlines() if f"request_id={request_id}" in line]


def logged(logs: Callable[[], list[str]], request_id: str, timeout: float = 10) -> list[str]:
    """The lines naming `request_id` in any of `logs`, waiting for them (a line is written after its answer)."""
    deadline = time.monotonic() + timeout
    while not (lines := [line for log in logs() for line in lines_with(log, request_id)]):
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    return lines


def check_generations_spread_over_both_instances(nginx: Nginx, servers: list[Server]) -> None:
    """Generations through nginx succeed, and both instances answer some."""
    responses = [post(nginx.url, {"prompt": f"Hello {i}", "max_new_tokens": 3}) for i in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    for server in servers:
        assert '"POST /generate' in server.log()


def check_stream_arrives_event_by_event(nginx: Nginx) -> None:
    """A stream through nginx reaches the client as its events are generated, not in one lump."""
    tokens = 60
    body = json.dumps(
        {"prompt": "Streaming through nginx", "max_new_tokens": tokens, "min_new_tokens": tokens, "stream": True}
    )
    port = int(nginx.url.rsplit(":", 1)[1])
    request = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    )
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(request.encode())
        while chunk := sock.recv(65536):
            arrivals.append((time.monotonic(), chunk))
    raw = b"".join(chunk for _, chunk in arrivals)
    assert raw.startswith(b"HTTP/1.1 200")
    count = raw.count(b"data: ")
    assert count > tokens // 2 and b'"completion_tokens": 60' in raw.rsplit(b"data: ", 1)[1]
    with_events = [t for t, chunk in arrivals if b"data: " in chunk]
    # The events come as they are generated, in many separate reads, not in one lump at the end.
    assert len(with_events) >= count // 3, (count, len(with_events))
    print(f"{count} events in {len(with_events)} reads over {with_events[-1] - with_events[0]:.2f}s")


def check_client_address_and_request_id_end_to_end(nginx: Nginx, servers: list[Server]) -> None:
    """The app logs the real client address and the request id that nginx and the client see."""
    port = int(nginx.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=("127.0.0.2", 0))
    headers = {
        "x-api-key": KEY,
        "content-type": "application/json",
        "X-Request-ID": "e2e-request-7",
        "X-Forwarded-For": "203.0.113.9",  # forged by the client: the app must not believe it
    }
    conn.request("POST", "/generate", json.dumps({"prompt": "Who am I?", "max_new_tokens": 3}), headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("X-Request-ID") == "e2e-request-7"
    response.read()
    conn.close()
    app_lines = logged(lambda: [s.log() for s in servers], "e2e-request-7")
    assert len(app_lines) == 1 and app_lines[0].startswith("127.0.0.2 "), app_lines  # the app saw the client
    (edge,) = logged(lambda: [nginx.log()], "e2e-request-7")
    assert edge.startswith("127.0.0.2 ") and '" 200 ' in edge

    minted = post(nginx.url, {"prompt": "No id of mine", "max_new_tokens": 2})
    request_id = minted.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)  # nginx's $request_id, passed on and echoed
    assert len(logged(lambda: [s.log() for s in servers], request_id)) == 1
    assert len(logged(lambda: [nginx.log()], request_id)) == 1


def check_oversized_bodies_refused_by_nginx_in_json(nginx: Nginx, servers: list[Server]) -> None:
    """A body of MAX_BODY_BYTES passes nginx; one byte more is refused by nginx, in the JSON error shape."""

    def body_of(size: int) -> bytes:
        padding = size - len(json.dumps({"prompt": "", "max_new_tokens": 1}))
        raw = json.dumps({"prompt": "a" * padding, "max_new_tokens": 1}).encode()
        assert len(raw) == size
        return raw

    headers = {"x-api-key": KEY, "content-type": "application/json"}
    fits = requests.post(
        nginx.url + "/generate", data=body_of(MAX_BODY), headers={**headers, "X-Request-ID": "fits-1"}, timeout=60
    )
    assert fits.status_code == 422  # through nginx; the app refuses the 1000-character prompt itself
    assert "prompt" in error_of(fits.json(), 422)["param"]
    assert len(logged(lambda: [s.log() for s in servers], "fits-1")) == 1

    too_big = requests.post(
        nginx.url + "/generate", data=body_of(MAX_BODY + 1), headers={**headers, "X-Request-ID": "big-1"}, timeout=60
    )
    assert too_big.status_code == 413
    assert str(MAX_BODY) in error_of(too_big.json(), 413)["message"]
    assert too_big.headers["X-Request-ID"] == "big-1"
    (edge,) = logged(lambda: [nginx.log()], "big-1")
    assert '" 413 ' in edge and "upstream=-" in edge
    assert sum(len(lines_with(s.log(), "big-1")) for s in servers) == 0  # never reached an instance


def check_metrics_kept_inside_and_gateway_errors_in_json(nginx: Nginx, servers: list[Server]) -> None:
    """/metrics is not served through nginx; with every instance down, nginx answers a JSON 502."""
    error_of(requests.get(nginx.url + "/metrics", timeout=10).json(), 404)
    for server in servers:
        server.stop()
    down = post(nginx.url, {"prompt": "anyone?"})
    assert down.status_code == 502
    assert "retry" in error_of(down.json(), 502)["message"]
    assert down.headers["Retry-After"] == "5"


def test_nginx_in_front_of_two_gunicorn_instances(nginx, servers):
    check_generations_spread_over_both_instances(nginx, servers)
    check_stream_arrives_event_by_event(nginx)
    check_client_address_and_request_id_end_to_end(nginx, servers)
    check_oversized_bodies_refused_by_nginx_in_json(nginx, servers)
    check_metrics_kept_inside_and_gateway_errors_in_json(nginx, servers)  # last: it stops the instances

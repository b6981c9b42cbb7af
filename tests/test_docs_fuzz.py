"""schemathesis against a real gunicorn serving the real tiny model: every check, valid and invalid data, key or not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import KEY, ROOT

ARTIFACTS = ROOT / "artifacts" / "schemathesis"
# Small limits keep each generation short, and they are in the spec, so schemathesis generates within them:
# 200 characters are at most 800 byte-level tokens, which with 8 new tokens fit the tiny model's 1024.
LIMITS = {
    "MAX_NEW_TOKENS_LIMIT": "8",
    "MAX_NEW_TOKENS_DEFAULT": "8",
    "MAX_PROMPT_CHARS": "200",
    "GENERATION_TIMEOUT_MS": "2000",
    "GENERATION_TIMEOUT_MAX_MS": "5000",
    "WEB_CONCURRENCY": "1",
    "GUNICORN_THREADS": "4",
}
MAX_EXAMPLES = 80  # per operation and phase; about half a minute with the key on two busy cores
RUN_TIMEOUT_S = 300


def schemathesis(url: str, *, name: str, headers: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run the schemathesis CLI with every check and both data modes; return the finished process."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json"]
    cmd += ["--checks", "all", "--mode", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", "20261124"]
    cmd += ["--workers", "2", "--request-timeout", "30", "--generation-database", "none", "--no-color"]
    cmd += ["--report", "junit", "--report-junit-path", str(ARTIFACTS / f"{name}.xml")]
    for header in headers:
        cmd += ["--header", header]
    # The hooks teach schemathesis the one request rule JSON Schema cannot state (min_new_tokens <= max_new_tokens).
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture
def server(start_server, tiny_model):
    """A real gunicorn on the tiny model with small limits, its model loaded at start (so /ready answers 200)."""
    server = start_server(MODEL_NAME=tiny_model, WARMUP="true", **LIMITS)
    deadline = time.monotonic() + 60
    while requests.get(server.url + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load within a minute"
        time.sleep(0.1)
    return server


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "headers"),
    [("with-key", [f"x-api-key: {KEY}"]), ("with-bearer", [f"Authorization: Bearer {KEY}"]), ("without-key", [])],
)
def test_schemathesis_finds_nothing(server, tmp_path, name, headers):
    run = schemathesis(server.url, name=name, headers=headers, tmp_path=tmp_path)
    report = run.stdout + run.stderr
    (ARTIFACTS / f"{name}.txt").write_text(report)
    assert run.returncode == 0, report[-6000:]
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    operations = [op for item in spec["paths"].values() for method, op in item.items() if method != "parameters"]
    count = len(operations)
    assert re.search(rf"Operations:\s+{count} selected / {count} total", report), report[-3000:]
    # Operations without parameters or body have few distinct cases; those with a body get the full budget.
    with_body = sum(1 for op in operations if "requestBody" in op)
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated and int(generated.group(1)) >= MAX_EXAMPLES * with_body, report[-3000:]
    # With a key, generation really ran (schemathesis warns when an operation only ever answered 401).
    assert ("Authentication failed" in report) is not bool(headers), report[-3000:]
    # Errors after a stream has started go in-band, where no status shows them: the log must be clean too.
    assert "Traceback" not in server.log() and "[ERROR]" not in server.log()


@pytest.mark.slow
def test_real_tokenizer_never_sees_an_unpaired_surrogate(server):
    """What made the fuzzed server answer 500 before: the tokenizer cannot encode a lone surrogate."""
    body = b'{"prompt": "\\ud800 lone"}'
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    response = requests.post(server.url + "/generate", data=body, headers=headers, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "prompt"
    assert "Traceback" not in server.log()

"""Chat workloads: a shared system prompt, long prompts among streams, and a soak of distinct prefixes.

Each workload runs against two servers started one after the other in the same run: the prefix cache and chunked
prefill on (the defaults) and off (PREFIX_CACHE_MB=0, PREFILL_CHUNK_TOKENS=0), so that their ratios compare
minutes of this machine that are as close as they can be. The unique-prompt loads of the main benchmark run on
both too (no regression with the features on).

- chat: 8 closed-loop clients over /v1/chat/completions, streaming; every request the same 600-token system prompt
  and a short user turn of its own; 32 new tokens.
- mixed: 6 clients streaming short prompts (/v1/completions, 64 new tokens) while 2 clients send 900-token prompts
  that share nothing (8 new tokens): the streams' inter-token latency while long prompts arrive.
- soak (--soak SECONDS): 4 clients sending distinct 600-token prompts; the server's PSS and the prefix caches'
  bytes, sampled as it runs, against PREFIX_CACHE_MB.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from typing import Any

from bench.server import KEY, Server, start, warm

OFF = {"PREFIX_CACHE_MB": "0", "PREFILL_CHUNK_TOKENS": "0"}
SENTENCE = "You are a helpful assistant for a bicycle shop; answer politely, briefly and only about bicycles. "
# (warm-up, window) seconds: a window of several requests of the slower server (cache off: 8 prefills of 600 tokens).
WINDOWS = {
    ("tiny", False): (3.0, 15.0),
    ("small", False): (30.0, 90.0),
    ("tiny", True): (2.0, 8.0),
    ("small", True): (20.0, 60.0),
}


def text_of(tokens: int, model: str) -> str:
    """Text that the model's tokenizer reads as about `tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = SENTENCE
    while len(tokenizer.encode(text)) < tokens:
        text += SENTENCE
    ids = tokenizer.encode(text)[:tokens]
    return tokenizer.decode(ids)


def workloads(model: str) -> dict[str, list[dict[str, Any]]]:
    """The client groups of each workload (see stream_load: "{n}" makes a request's body its own)."""
    system, long = text_of(600, model), text_of(900, model)
    chat = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Question {n}: which tyre?"}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    short = {"model": model, "prompt": "Stream {n}: once upon a time", "max_tokens": 64, "temperature": 0}
    return {
        "chat": [{"name": "chat", "path": "/v1/chat/completions", "body": chat, "clients": 8, "stream": True}],
        "mixed": [
            {
                "name": "streams",
                "path": "/v1/completions",
                "body": {**short, "stream": True, "stream_options": {"include_usage": True}},
                "clients": 6,
                "stream": True,
            },
            {
                "name": "long prompts",
                "path": "/v1/completions",
                "body": {"model": model, "prompt": "Request {n}. " + long, "max_tokens": 8, "temperature": 0},
                "clients": 2,
                "stream": False,
            },
        ],
    }


def workers(path: str, env: dict[str, str]) -> int:
    """How many workers a server of `path` started with `env` runs (each is warmed before a window)."""
    from bench.__main__ import server_settings

    return server_settings(path, env).web_concurrency


def stream_run(server: Server, groups: list[dict[str, Any]], window: tuple[float, float]) -> dict[str, Any]:
    """One stream_load run in its own process."""
    from bench.__main__ import QUIET_WAIT_S, run_python, wait_for_quiet

    wait_for_quiet(QUIET_WAIT_S[0])
    args = ["--url", server.url, "--key", KEY, "--groups", json.dumps(groups)]
    return run_python("bench.stream_load", *args, "--warmup", str(window[0]), "--seconds", str(window[1]))


def scrape(server: Server) -> dict[str, float]:
    """The unlabelled samples of /metrics (summed over the workers)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(llmapi_[a-z_]+) (\S+)$", text, re.M)}


def suite(
    path: str, size: str, *, quick: bool, unique: list[tuple[str, dict[str, Any], int]], load_run: Any
) -> dict[str, Any]:
    """Every workload on the features-on server, then on the features-off one; memory after each."""
    window = WINDOWS[(size, quick)]
    served = workloads(path)
    figures: dict[str, Any] = {}
    for label, env in (("on", {}), ("off", OFF)):
        print(f"chat workloads: {size}, features {label} ...", file=sys.stderr)
        server = start(path, {"ENGINE_MODE": "batch", "SERVED_MODEL_NAME": path, **env}, timeout=120)
        try:
            warm(server, {"prompt": "Hello", "max_new_tokens": 2}, workers(path, env))
            runs: dict[str, Any] = {}
            for name, groups in served.items():
                print(f"  {name}", file=sys.stderr)
                runs[name] = stream_run(server, groups, window)
                runs[name]["pss_mib"] = server.memory()["pss_mib"]
                runs[name]["metrics"] = scrape(server)
            for name, body, clients in unique:
                print(f"  unique {name}, {clients} clients", file=sys.stderr)
                runs[f"unique {name}/{clients}"] = load_run(server, body, clients, window)
            figures[label] = runs
        finally:
            server.stop()
    return figures


def soak(path: str, seconds: float, *, cache_mb: str | None = None) -> dict[str, Any]:
    """Distinct 600-token prompts from 4 clients for `seconds`; PSS and cache bytes every 15 s."""
    env = {"ENGINE_MODE": "batch", "SERVED_MODEL_NAME": path, **({"PREFIX_CACHE_MB": cache_mb} if cache_mb else {})}
    server = start(path, env, timeout=120)
    body = {"model": path, "prompt": "Prefix {n}. " + text_of(600, path), "max_tokens": 4, "temperature": 0}
    groups = [{"name": "soak", "path": "/v1/completions", "body": body, "clients": 4, "stream": False}]
    try:
        warm(server, {"prompt": "Hello", "max_new_tokens": 2}, workers(path, env))
        import subprocess

        loader = subprocess.Popen(
            [sys.executable, "-m", "bench.stream_load", "--url", server.url, "--key", KEY, "--groups",
             json.dumps(groups), "--warmup", "0", "--seconds", str(seconds)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        samples = []
        began = time.monotonic()
        while loader.poll() is None:
            time.sleep(15)
            metrics = scrape(server)
            samples.append(
                {
                    "t_s": round(time.monotonic() - began),
                    "pss_mib": server.memory()["pss_mib"],
                    "cache_mib": metrics.get("llmapi_prefix_cache_bytes", 0) / 2**20,
                    "capacity_mib": metrics.get("llmapi_prefix_cache_capacity_bytes", 0) / 2**20,
                    "prompt_tokens": metrics.get("llmapi_prompt_tokens_total", 0),
                }
            )
            print(f"  soak {samples[-1]}", file=sys.stderr)
        out = json.loads(loader.stdout.read().strip().splitlines()[-1])
        return {"seconds": seconds, "samples": samples, "load": out["soak"]}
    finally:
        server.stop()

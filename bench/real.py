"""The real model (SmolLM2-135M-Instruct, the GGUF file `make run` serves) beside llama.cpp's server on the same file.

Two measurements, in one run (`python -m bench --real`, or `make bench BENCH=--real`):

1. Agreement: greedy continuations of a fixed prompt set from llmapi and from `llama-server`, both reading the same
   GGUF file (llmapi converts it with transformers' reader, llama.cpp computes on its quantized blocks). Each pair of
   texts is tokenized with the model's own tokenizer and the length of their common prefix, in tokens, is reported:
   both start from the same weights, so an early disagreement points at a tokenizer, template, RoPE, norm epsilon or
   EOS bug rather than at rounding.
2. Speed: llmapi's defaults and `llama-server -t <cores>` under the same closed-loop load at 1, 8 and 32 clients,
   T new tokens (64 by default), greedy, and each one's memory after load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import peers as peer
from bench.server import post, start, warm

GGUF_CACHE = peer.ROOT / "models" / "gguf-cache"
REAL_MODEL = peer.ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# Prompts of the kinds people send: facts, definitions, a story, code, a list, a dialogue turn, a number.
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "Artificial Intelligence is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Photosynthesis is the process by which",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "The best way to learn a new language is",
]
AGREEMENT_TOKENS = 48


def tokenizer(path: str) -> Any:
    """The model's own tokenizer, from the conversion the server made."""
    from transformers import AutoTokenizer

    folder = next(p for p in sorted(GGUF_CACHE.glob(f"{Path(path).stem}-*")) if (p / "tokenizer.json").exists())
    return AutoTokenizer.from_pretrained(folder)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def continuations(url: str) -> list[str]:
    """The greedy continuation of every agreement prompt from one server's /v1/completions (the key is ignored
    by llama-server)."""
    texts = []
    for prompt in AGREEMENT_PROMPTS:
        body = {"prompt": prompt, "max_tokens": AGREEMENT_TOKENS, "temperature": 0.0}
        status, answer = post(url + "/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"{url}: {status} {answer}")
        texts.append(answer["choices"][0]["text"])
    return texts


def agreement(path: str, ours: str, theirs: str) -> dict[str, Any]:
    """Greedy continuations from both servers and their common prefixes in tokens."""
    tok = tokenizer(path)
    mine, llama = continuations(ours), continuations(theirs)
    rows = []
    for prompt, a, b in zip(AGREEMENT_PROMPTS, mine, llama, strict=True):
        ids_a, ids_b = tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)
        shortest = min(len(ids_a), len(ids_b))
        common = common_prefix(ids_a, ids_b)
        row = {"prompt": prompt, "common": common, "of": shortest, "llmapi": a, "llama": b}
        if common < shortest:  # where they part: both engines' top candidates in the same context
            context = tok(prompt)["input_ids"] + ids_a[:common]
            row["parting"] = {
                "llmapi": top_candidates(ours, context, key=True),
                "llama": top_candidates(theirs, context),
            }
        rows.append(row)
    return {"tokens": AGREEMENT_TOKENS, "prompts": rows}


def top_candidates(url: str, context: list[int], *, key: bool = False) -> list[tuple[str, float]]:
    """One server's three likeliest next tokens after the token ids `context`, with their log-probabilities."""
    if key:  # llmapi: /v1/completions with token ids and logprobs
        body = {"prompt": context, "max_tokens": 1, "temperature": 0.0, "logprobs": 3}
        status, answer = post(url + "/v1/completions", body)
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0] if status == 200 else {}
        return sorted(top.items(), key=lambda item: -item[1])
    body = {"prompt": context, "n_predict": 1, "n_probs": 3, "temperature": 0.0}  # llama-server's own /completion
    status, answer = post(url + "/completion", body)
    found = answer["completion_probabilities"][0]["top_logprobs"] if status == 200 else []
    return [(item["token"], item["logprob"]) for item in found]


def run(
    path: str,
    body: dict[str, Any],
    clients: list[int],
    window: tuple[float, float],
    *,
    load_run: Callable[..., dict[str, Any]],
    workers: int,
    variants: dict[str, dict[str, str]] | None = None,
    agree: bool = True,
) -> dict[str, Any]:
    """llama-server and llmapi on the GGUF file `path` (its defaults, then each of `variants`' environments): the
    agreement with llama-server (unless `agree` is off), then load at each client count, each server alone."""
    variants = {"defaults": {}, **(variants or {})}
    figures: dict[str, Any] = {"model": path, "variants": variants}
    if agree:
        print("real: load times, first (converting) and cached ...", file=sys.stderr)
        figures["load"] = load_times(path)
    threads = os.cpu_count() or 1
    print("real: llama-server on the GGUF as distributed ...", file=sys.stderr)
    theirs = peer.start_llama(Path(path), threads=threads, parallel=max(clients))
    llama_body = peer.llama_body(body["max_new_tokens"])
    try:
        if agree:
            print("real: llmapi defaults on the same file ...", file=sys.stderr)
            ours = start(path, {"GGUF_CACHE_DIR": str(GGUF_CACHE)}, timeout=120.0)
            try:
                warm(ours, body, workers)
                figures["agreement"] = agreement(path, ours.url, theirs.url)
            finally:
                ours.stop()
        post(theirs.url + "/v1/completions", llama_body)
        figures["llama"] = {"memory_after_load": theirs.memory(), "loads": {}}
        for n in clients:
            print(f"  llama-server, {n} clients", file=sys.stderr)
            figures["llama"]["loads"][f"greedy/{n}"] = load_run(theirs, llama_body, n, window, path="/v1/completions")
    finally:
        theirs.stop()
    figures["llmapi"] = {
        name: serve(path, env, body, clients, window, load_run, workers) for name, env in variants.items()
    }
    return figures


def serve(
    path: str,
    env: dict[str, str],
    body: dict[str, Any],
    clients: list[int],
    window: tuple[float, float],
    load_run: Callable[..., dict[str, Any]],
    workers: int,
) -> dict[str, Any]:
    """llmapi on `path` with `env` over its defaults: memory after load, then load at each client count."""
    ours = start(path, {"GGUF_CACHE_DIR": str(GGUF_CACHE), **env}, timeout=180.0)
    try:
        figures: dict[str, Any] = {"health_s": ours.health_s, **warm(ours, body, workers)}
        figures["memory_after_load"] = ours.memory()
        figures["loads"] = {}
        for n in clients:
            print(f"  llmapi {env or 'defaults'}, {n} clients", file=sys.stderr)
            figures["loads"][f"greedy/{n}"] = load_run(ours, body, n, window)
    finally:
        ours.stop()
    return figures


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:KEY=VALUE,KEY=VALUE` (the command line's --real-env) as (name, environment)."""
    name, _, assignments = text.partition(":")
    return name, dict(item.split("=", 1) for item in assignments.split(",") if item)


LOAD_SCRIPT = """
import json, sys, time
from llmapi.engine.loader import load
started = time.perf_counter()
loaded = load(sys.argv[1], device="auto", dtype="auto", gguf_cache_dir=sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - started, "dtype": loaded.dtype}))
"""


def load_times(path: str) -> dict[str, Any]:
    """Seconds to load the GGUF file in a fresh process: first (converting into an empty cache), then cached."""
    import json
    import subprocess
    import tempfile

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmapi-gguf-") as cache:
        for name in ("first", "cached"):
            done = subprocess.run(
                [sys.executable, "-c", LOAD_SCRIPT, path, cache], capture_output=True, text=True, check=True
            )
            figures[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


if __name__ == "__main__":
    times = load_times(str(REAL_MODEL))
    for name, figure in times.items():
        print(f"{name} load of {REAL_MODEL.name}: {figure['seconds']:.1f} s ({figure['dtype']})")

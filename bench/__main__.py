"""The benchmark: `python -m bench [--quick]` (or `make bench`). Prints tables and writes bench/results/*.json.

1. Builds models/tiny-gpt2 and models/small-gpt2 if absent.
2. The limits in one process, no HTTP (T new tokens, batch 1 and 8): the forward-pass floor, `model.generate`
   greedy and sampled, and our engine called directly.
3. The server: real gunicorn with gunicorn.conf.py, in batch mode and in the baseline mode (ENGINE_MODE=simple),
   under closed-loop load at 1, 8 and 32 clients, greedy and sampled (temperature 0.8), plus seeded sampled
   requests at 8 clients; cold start to /health, first generate, model load, memory after load and after the run.
4. The chat workloads (bench/chat.py): a shared 600-token system prompt over /v1/chat/completions, streams among
   900-token prompts, and the unique-prompt greedy and sampled loads at 8 clients, each with the prefix cache and
   chunked prefill on and off in the same run; `--soak SECONDS` adds a soak of distinct prefixes.
5. A chart (bench/results/*.png): new tokens/s and p50/p99 latency against clients, per model.

`--real` instead runs the real model (SmolLM2-135M-Instruct, the GGUF file `make run` serves) beside llama.cpp's
llama-server on the same file: greedy agreement token by token, and load at 1, 8 and 32 clients (bench/real.py).

`--peers` instead runs llmapi (fp32 as before, today's defaults, int8) beside its peers on the small model, all in
one run: CTranslate2 (int8, fp32) in process at batch 1 and 8, and llama.cpp's llama-server (bf16, q8_0 GGUF)
under the same load generator at 1, 8 and 32 clients (see bench/peers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import chart, chat, real, report
from bench.server import KEY, ROOT, post, start, warm

PROMPT = "Artificial Intelligence is"
# Before each load run, wait at most this long for other processes to go quiet (--quiet-wait, or BENCH_QUIET_S).
QUIET_WAIT_S = [float(os.environ.get("BENCH_QUIET_S", "90"))]
MODELS = {"tiny": ROOT / "models" / "tiny-gpt2", "small": ROOT / "models" / "small-gpt2"}
# (warm-up, window) seconds of each load run: a window several latencies long, after a warm-up of about one.
WINDOWS = {
    ("tiny", False): (2.0, 10.0),
    ("small", False): (10.0, 30.0),
    ("tiny", True): (1.0, 4.0),
    ("small", True): (5.0, 12.0),
}


def ensure_models(sizes: list[str]) -> dict[str, str]:
    """Build the offline models that are missing; return their directories."""
    from llmapi.build_model import build

    for size in sizes:
        if not (MODELS[size] / "config.json").exists():
            print(f"building {size} model into {MODELS[size]} ...", file=sys.stderr)
            build(MODELS[size], size=size)
    return {size: str(MODELS[size]) for size in sizes}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit.stdout.strip(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def busy_cores() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


def wait_for_quiet(limit_s: float, *, idle_below: float = 0.25) -> float:
    """Wait (up to `limit_s`) until the machine's other work uses under `idle_below` cores; return what it used.

    Other processes on a 2-core box (test suites, builds) would otherwise land in the middle of a load run.
    """
    deadline = time.monotonic() + limit_s
    while True:
        busy0, _ = busy_cores()
        time.sleep(1.0)
        busy = busy_cores()[0] - busy0
        if busy < idle_below or time.monotonic() > deadline:
            return busy
        time.sleep(2.0)


def children_cpu() -> float:
    """CPU seconds used so far by this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_python(module: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process and parse the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def limits(models: dict[str, str], *, quick: bool, new_tokens: int) -> dict[str, Any]:
    """In-process limits of every model at 1 torch thread and at all cores, each in a fresh process."""
    figures: dict[str, Any] = {}
    for size, path in models.items():
        for threads in sorted({1, os.cpu_count() or 1}):
            wait_for_quiet(QUIET_WAIT_S[0])
            print(f"limits: {size}, {threads} torch thread(s) ...", file=sys.stderr)
            args = ["--model", path, "--threads", str(threads), "--new-tokens", str(new_tokens)]
            own0, (busy0, _), wall0 = children_cpu(), busy_cores(), time.perf_counter()
            result = run_python("bench.limits", *args, *(["--quick"] if quick else []))
            wall = time.perf_counter() - wall0
            result["other_cores"] = max(0.0, (busy_cores()[0] - busy0 - (children_cpu() - own0)) / wall)
            figures[f"{size}/threads{threads}"] = result
    return figures


def requests_by_worker(lines: list[str]) -> list[int]:
    """How many generate requests each worker answered with 200, busiest first, from gunicorn's access log."""
    counts: dict[str, int] = {}
    for line in lines:
        if "POST /generate" in line and '" 200 ' in line and "pid=<" in line:
            pid = line.rsplit("pid=<", 1)[1].split(">", 1)[0]
            counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


def load_run(
    server: Any, body: dict[str, Any], clients: int, window: tuple[float, float], *, path: str = "/generate"
) -> dict[str, Any]:
    """One closed-loop load in a separate process, with the server's and the machine's CPU use over it."""
    quiet = wait_for_quiet(QUIET_WAIT_S[0])
    log_lines = len(server.log().splitlines())
    cpu0, (busy0, total0), wall0 = server.cpu_seconds(), busy_cores(), time.perf_counter()
    result = run_python(
        "bench.load",
        *("--url", server.url + path, "--key", KEY, "--body", json.dumps(body)),
        *("--clients", str(clients), "--warmup", str(window[0]), "--seconds", str(window[1])),
    )
    wall = time.perf_counter() - wall0
    busy1, _ = busy_cores()
    result["server_cores"] = (server.cpu_seconds() - cpu0) / wall
    result["machine_busy_cores"] = (busy1 - busy0) / wall
    result["other_cores"] = max(0.0, result["machine_busy_cores"] - result["server_cores"] - result["loadgen_cores"])
    result["busy_before"] = quiet
    result["requests_by_worker"] = requests_by_worker(server.log().splitlines()[log_lines:])
    del total0
    return result


def server_settings(path: str, env: dict[str, str]) -> Any:
    """The Settings a server of model `path` started with `env` (over this environment) runs with."""
    from llmapi.config import Settings

    return Settings.from_env({**os.environ, "API_KEY": KEY, "MODEL_NAME": str(path), **env})


def serve(path: str, size: str, mode: str, env: dict[str, str], plan: list[tuple[str, dict, int]], *, quick: bool):
    """Start one server, warm it, run every load of `plan` on it, and record memory before and after."""
    print(f"server: {size}, ENGINE_MODE={mode} {env or ''} ...", file=sys.stderr)
    server = start(path, {"ENGINE_MODE": mode, **env})
    try:
        workers = server_settings(path, env).web_concurrency
        figures: dict[str, Any] = {"health_s": server.health_s}
        figures.update(warm(server, plan[0][1], workers))
        figures["memory_after_load"] = server.memory()
        loads = {}
        memory = []
        for name, body, clients in plan:
            print(f"  {name}, {clients} clients", file=sys.stderr)
            loads[f"{name}/{clients}"] = load_run(server, body, clients, WINDOWS[(size, quick)])
            memory.append(server.memory()["pss_mib"])
        figures["loads"] = loads
        figures["pss_mib_after_each_load"] = memory
        figures["memory_after_run"] = server.memory()
        return figures
    finally:
        server.stop()


# Settings compared by --sweep, each against the defaults (DTYPE=auto: bf16 for the small model on this CPU, fp32
# for the tiny one; WEB_CONCURRENCY=0: one worker for the small model, two for the tiny one and for int8;
# TORCH_THREADS=0 i.e. cores / workers; MAX_BATCH_SIZE=0: 32 for one worker, 8 each for two), in bf16 and int8.
ONE_BY_TWO = {"WEB_CONCURRENCY": "1", "TORCH_THREADS": "2"}
TWO_BY_ONE = {"WEB_CONCURRENCY": "2", "TORCH_THREADS": "1"}
INT8 = {"QUANTIZATION": "int8"}
SWEEP: list[dict[str, str]] = [
    {},
    {**ONE_BY_TWO, "MAX_BATCH_SIZE": "16"},
    TWO_BY_ONE,
    {**TWO_BY_ONE, "MAX_BATCH_SIZE": "16"},
    INT8,
    {**INT8, "MAX_BATCH_SIZE": "16"},
    {**INT8, **ONE_BY_TWO, "MAX_BATCH_SIZE": "32"},
]


def sweep(models: dict[str, str], payloads: dict[str, dict[str, Any]], *, quick: bool) -> dict[str, Any]:
    """Serve every model with each SWEEP setting under greedy load at 1, 8 and 32 clients."""
    plan = [("greedy", payloads["greedy"], n) for n in (1, 8, 32)]
    figures: dict[str, Any] = {}
    for size, path in models.items():
        for env in SWEEP:
            name = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
            figures[f"{size}/{name}"] = serve(path, size, "batch", env, plan, quick=quick)
    return figures


# The llmapi servers --peers runs: the fp32 server as it was before DTYPE (the old defaults), bf16 in that layout,
# today's defaults (bf16, one worker of 2 threads and 32 rows on the small model), and int8 (two workers of 8 rows).
PEER_VARIANTS = {
    "fp32 2x1 (before)": {"DTYPE": "float32", "WEB_CONCURRENCY": "2", "TORCH_THREADS": "1", "MAX_BATCH_SIZE": "8"},
    "bf16 2x1": {"WEB_CONCURRENCY": "2", "TORCH_THREADS": "1", "MAX_BATCH_SIZE": "8"},
    "defaults": {},
    "int8": {"QUANTIZATION": "int8"},
}


def peers(path: str, payloads: dict[str, dict[str, Any]], clients: list[int], *, quick: bool, new_tokens: int):
    """llmapi (PEER_VARIANTS) and its baseline, CTranslate2 in process and llama-server over HTTP, in one run."""
    from bench import peers as peer

    threads = os.cpu_count() or 1
    repeats = "3" if quick else "7"
    figures: dict[str, Any] = {"ct2": {}, "generate": {}, "servers": {}, "llama": {}}
    for quantization in ("int8", "float32"):
        print(f"peers: CTranslate2 {quantization} ...", file=sys.stderr)
        wait_for_quiet(QUIET_WAIT_S[0])
        args = ["ct2", "--model", path, "--quantization", quantization, "--threads", str(threads)]
        figures["ct2"][quantization] = run_python(
            "bench.peers", *args, "--new-tokens", str(new_tokens), "--repeats", repeats
        )
    plan = [("greedy", payloads["greedy"], n) for n in clients]
    for name, env in PEER_VARIANTS.items():
        settings = server_settings(path, env)
        args = ["generate", "--model", path, "--env", json.dumps(env), "--threads", str(settings.torch_threads)]
        figures["generate"][name] = run_python(
            "bench.peers", *args, "--new-tokens", str(new_tokens), "--repeats", repeats
        )
        figures["servers"][name] = serve(path, "small", "batch", env, plan, quick=quick)
    figures["servers"]["baseline"] = serve(path, "small", "simple", {}, plan, quick=quick)
    body = peer.llama_body(new_tokens)
    for outtype in ("bf16", "q8_0"):
        print(f"peers: llama-server {outtype} ...", file=sys.stderr)
        server = peer.start_llama(peer.gguf(path, outtype), threads=threads, parallel=max(clients))
        try:
            post(server.url + "/v1/completions", body)
            run = {"health_s": server.health_s, "memory_after_load": server.memory(), "loads": {}}
            for n in clients:
                result = load_run(server, body, n, WINDOWS[("small", quick)], path="/v1/completions")
                run["loads"][f"greedy/{n}"] = result
            figures["llama"][outtype] = run
        finally:
            server.stop()
    return figures


def real_run(
    clients: list[int], *, quick: bool, new_tokens: int, variants: list[str] | None = None, agree: bool = True
) -> dict[str, Any]:
    """The real model beside llama-server on its GGUF file (bench/real.py), T = `new_tokens` greedy."""
    path = str(real.REAL_MODEL)
    if not real.REAL_MODEL.exists():
        raise SystemExit(f"{path} is missing: `make real-model` gets it")
    body = bodies(new_tokens)["greedy"]
    workers = server_settings(path, {}).web_concurrency
    return real.run(
        path,
        body,
        clients,
        WINDOWS[("small", quick)],
        load_run=load_run,
        workers=workers,
        variants=dict(real.parse_variant(v) for v in variants or []),
        agree=agree,
    )


def bodies(new_tokens: int) -> dict[str, dict[str, Any]]:
    """The request bodies: exactly `new_tokens` new tokens (min = max), greedy, sampled, sampled with a seed."""
    base = {"prompt": PROMPT, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    return {
        "greedy": {**base, "temperature": 0.0},
        "sampled": {**base, "temperature": 0.8},
        "seeded": {**base, "temperature": 0.8, "seed": 1234},
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run everything asked for, print the report and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows and fewer repeats (about 7 minutes)")
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--clients", default="1,8,32", help="closed-loop client counts")
    parser.add_argument("--new-tokens", type=int, default=32, help="T: new tokens per request")
    parser.add_argument("--no-limits", action="store_true", help="skip the in-process limits")
    parser.add_argument("--no-baseline", action="store_true", help="skip the ENGINE_MODE=simple server")
    parser.add_argument("--sweep", action="store_true", help="compare worker, thread and batch settings instead")
    parser.add_argument("--peers", action="store_true", help="llmapi beside CTranslate2 and llama.cpp (small model)")
    parser.add_argument(
        "--real", action="store_true", help="the real model (SmolLM2 GGUF) beside llama-server on the same file"
    )
    parser.add_argument(
        "--real-env",
        action="append",
        default=[],
        help="with --real, one more llmapi server: NAME:KEY=VALUE,... (e.g. int4:QUANTIZATION=int4)",
    )
    parser.add_argument("--no-agreement", action="store_true", help="with --real, skip agreement and load times")
    parser.add_argument(
        "--quiet-wait", type=float, default=QUIET_WAIT_S[0], help="seconds to wait for a quiet machine per run"
    )
    parser.add_argument("--no-chat", action="store_true", help="skip the chat workloads")
    parser.add_argument("--only-chat", action="store_true", help="only the chat workloads (and --soak)")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of distinct-prefix soak (default: none)")
    parser.add_argument("--only-soak", action="store_true", help="only the soak (with --soak SECONDS)")
    parser.add_argument("--soak-cache-mb", help="PREFIX_CACHE_MB of the soak's server (default: the default)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default bench/results/bench-<time>.json)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    clients = [int(c) for c in args.clients.split(",")]
    models = ensure_models(sizes)
    QUIET_WAIT_S[0] = args.quiet_wait
    results: dict[str, Any] = {"machine": machine(), "new_tokens": args.new_tokens, "quick": args.quick}
    if args.peers:
        path = ensure_models(["small"])["small"]
        results["peers"] = peers(path, bodies(args.new_tokens), clients, quick=args.quick, new_tokens=args.new_tokens)
        return finish(results, args.out, report.render_peers(results))
    if args.real:
        results["real"] = real_run(
            clients, quick=args.quick, new_tokens=args.new_tokens, variants=args.real_env, agree=not args.no_agreement
        )
        return finish(results, args.out, report.render_real(results))
    if args.sweep:
        results["sweep"] = sweep(models, bodies(args.new_tokens), quick=args.quick)
        return finish(results, args.out, report.render_sweep(results))
    if args.only_chat or args.only_soak:
        return finish(results, args.out, report.render_chat(chats(models, args, into=results)))
    if not args.no_limits:
        results["limits"] = limits(models, quick=args.quick, new_tokens=args.new_tokens)
        results["http_cost_us"] = run_python("bench.http_cost", "--model", next(iter(models.values())))
    payloads = bodies(args.new_tokens)
    # Greedy and sampled windows of one client count run back to back, so that their ratio (a target) compares
    # minutes of this noisy machine that are as close as they can be.
    plan = [(name, payloads[name], n) for n in clients for name in ("greedy", "sampled")]
    plan.append(("seeded", payloads["seeded"], 8))
    results["servers"] = {}
    for size, path in models.items():
        for mode in ("batch",) if args.no_baseline else ("batch", "simple"):
            results["servers"][f"{size}/{mode}"] = serve(path, size, mode, {}, plan, quick=args.quick)
    if not args.no_chat:
        chats(models, args, into=results)
    return finish(results, args.out, report.render(results))


def chats(models: dict[str, str], args: argparse.Namespace, *, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chat workloads of every model, features on and off, and the soak when asked; into `into`."""
    results = into if into is not None else {}
    results.setdefault("machine", machine())
    payloads = bodies(args.new_tokens)
    unique = [("greedy", payloads["greedy"], 8), ("sampled", payloads["sampled"], 8)]
    if not args.only_soak:
        results["chat"] = {
            size: chat.suite(path, size, quick=args.quick, unique=unique, load_run=load_run)
            for size, path in models.items()
        }
    if args.soak:
        size, path = list(models.items())[-1]
        results["soak"] = {size: chat.soak(path, args.soak, cache_mb=args.soak_cache_mb)}
    return results


def finish(results: dict[str, Any], out: Path | None, text: str) -> int:
    """Write the JSON and the chart, print the report."""
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out = out or ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(text)
    print(f"\nJSON: {out}")
    if "sweep" not in results:
        try:
            drawn = chart.draw(results, out.with_suffix(".png"))
            print(f"chart: {drawn}" if drawn else "chart: none (no load curves in this run)")
        except ImportError:
            print("chart: matplotlib is not installed (pip install -e .[bench])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Render the benchmark's figures as plain-text tables, with the ratios and the targets beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Align columns: text to the left, numbers to the right."""
    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if i < 2 or n == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any) -> str:
    """Numbers with sensible precision; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def best_floor(results: dict[str, Any], size: str, batch: int) -> float | None:
    """The fastest forward-pass floor measured for `size` at `batch`, over thread counts and argmax kinds."""
    found = [
        max(figures[f"batch{batch}"]["floor"], figures[f"batch{batch}"]["floor_torch_argmax"])
        for key, figures in results.get("limits", {}).items()
        if key.startswith(f"{size}/")
    ]
    return max(found) if found else None


def limits_table(results: dict[str, Any]) -> str:
    """The in-process limits, new tokens/s."""
    rows = []
    for key, figures in results.get("limits", {}).items():
        size, threads = key.split("/")
        for batch in (1, 8):
            f = figures[f"batch{batch}"]
            rows.append(
                [size, threads.removeprefix("threads") + " thr", batch, f["floor"], f["floor_torch_argmax"],
                 f["generate_greedy"], f["generate_sampled"], f["engine_greedy"], f["engine_sampled"],
                 f.get("engine_sampled_inverse_cdf"),
                 f["generate_greedy_s"] * 1000, figures.get("other_cores")]
            )  # fmt: skip
    header = ["model", "torch", "batch", "floor", "floor(torch argmax)", "generate greedy", "generate sampled",
              "engine greedy", "engine sampled", "engine sampled (inverse CDF)", "generate ms",
              "other procs"]  # fmt: skip
    return table(header, rows)


def server_table(results: dict[str, Any]) -> str:
    """Every load run: throughput, latency, errors and who used the CPU."""
    rows = []
    for key, figures in results["servers"].items():
        size, mode = key.split("/")
        for name, r in figures["loads"].items():
            load, clients = name.split("/")
            rows.append(
                [size, mode, load, int(clients), r["requests_per_s"], r["tokens_per_s"], ms(r["p50_s"]),
                 ms(r["p90_s"]), ms(r["p99_s"]), r["errors"], r["server_cores"], r["loadgen_cores"],
                 r.get("other_cores"), split(r.get("requests_by_worker"))]
            )  # fmt: skip
    header = ["model", "mode", "load", "clients", "req/s", "new tok/s", "p50 ms", "p90 ms", "p99 ms", "errors",
              "server cores", "loadgen cores", "other procs", "per worker"]  # fmt: skip
    return table(header, rows)


def startup_table(results: dict[str, Any]) -> str:
    """Cold start, first generate, model load and memory of every server."""
    rows = []
    for key, f in results["servers"].items():
        size, mode = key.split("/")
        rows.append(
            [size, mode, f["health_s"], f["model_load_s"], f["first_generate_s"], f["memory_after_load"]["pss_mib"],
             " ".join(f"{m:.0f}" for m in f.get("pss_mib_after_each_load", [])), f["memory_after_load"]["rss_mib"],
             f["memory_after_run"]["rss_mib"]]
        )  # fmt: skip
    header = ["model", "mode", "/health s", "model load s", "first generate s", "PSS MiB loaded",
              "PSS MiB after each load run", "RSS MiB loaded", "RSS MiB after"]  # fmt: skip
    return table(header, rows)


def split(counts: list[int] | None) -> str:
    """Requests per worker as percentages, busiest first (e.g. 55/45)."""
    if not counts:
        return "-"
    total = sum(counts)
    return "/".join(str(round(100 * c / total)) for c in counts)


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds."""
    return None if seconds is None else seconds * 1000


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def targets(results: dict[str, Any]) -> str:
    """The issue's targets, each with its measured ratio."""
    servers, rows = results["servers"], []

    def load(size: str, mode: str, name: str) -> dict[str, Any] | None:
        return servers.get(f"{size}/{mode}", {}).get("loads", {}).get(name)

    for size, goal in (("small", 0.8), ("tiny", 0.5)):
        run, floor = load(size, "batch", "greedy/8"), best_floor(results, size, 8)
        if run and floor:
            rows.append([f"{size}: 8 clients greedy / batch-8 floor", f">= {goal}", ratio(run["tokens_per_s"], floor)])
    for key in servers:
        size, mode = key.split("/")
        for clients in (1, 8, 32):
            greedy, sampled = load(size, mode, f"greedy/{clients}"), load(size, mode, f"sampled/{clients}")
            if greedy and sampled:
                value = ratio(sampled["tokens_per_s"], greedy["tokens_per_s"])
                rows.append([f"{size} {mode}: sampled / greedy, {clients} clients", ">= 0.8", value])
    for size in ("tiny", "small"):
        one = load(size, "batch", "greedy/1")
        generate = results.get("limits", {}).get(f"{size}/threads1", {}).get("batch1", {}).get("generate_greedy_s")
        if one and generate:
            rows.append([f"{size}: 1 client p50 / in-process generate", "<= 1.15", ratio(one["p50_s"], generate)])
        many = load(size, "batch", "greedy/32")
        if many:
            rows.append([f"{size}: 32 clients greedy errors", "0", many["errors"]])
            rows.append([f"{size}: 32 clients greedy p99 / p50", "bounded", ratio(many["p99_s"], many["p50_s"])])
    for key, f in servers.items():
        rows.append([f"{key}: /health after launch, s", "<= 1", f["health_s"]])
    return table(["target", "goal", "measured"], rows)


def comparisons(results: dict[str, Any]) -> str:
    """Batch mode against the baseline, and seeded (own lane) against unseeded sampling."""
    servers, rows = results["servers"], []
    for key, f in servers.items():
        size, mode = key.split("/")
        if mode != "batch":
            continue
        base = servers.get(f"{size}/simple", {}).get("loads", {})
        floor = best_floor(results, size, 8)
        for name, r in f["loads"].items():
            b = base.get(name)
            rows.append(
                [size, name, r["tokens_per_s"], b["tokens_per_s"] if b else None,
                 ratio(r["tokens_per_s"], b["tokens_per_s"]) if b else None, ratio(r["tokens_per_s"], floor),
                 ratio(b["p50_s"], r["p50_s"]) if b else None]
            )  # fmt: skip
    header = ["model", "load/clients", "batch tok/s", "baseline tok/s", "x baseline", "x b8 floor",
              "baseline p50 / batch p50"]  # fmt: skip
    return table(header, rows)


def render(results: dict[str, Any]) -> str:
    """The whole report."""
    m = results["machine"]
    head = (
        f"llmapi benchmark, T = {results['new_tokens']} new tokens, {m['cpus']} CPUs, torch {m['torch']}, "
        f"transformers {m['transformers']}, commit {m['commit']}, {m['started']}"
        f"{' (quick)' if results['quick'] else ''}\n"
        f"load average at start {fmt_load(m['loadavg_at_start'])}, at end {fmt_load(m.get('loadavg_at_end'))}"
        " (other processes on the machine make every figure noisier)"
    )
    parts = [head]
    if results.get("limits"):
        parts += ["In-process limits, new tokens/s (no HTTP):", limits_table(results)]
    if results.get("http_cost_us"):
        rows = [[name, value] for name, value in results["http_cost_us"].items()]
        parts += ["HTTP side, CPU us per request (one process, an engine that answers at once):",
                  table(["part", "us"], rows)]  # fmt: skip
    parts += [
        "Server under closed-loop load (real gunicorn, gunicorn.conf.py defaults):",
        server_table(results),
        "Start-up and memory (all server processes):",
        startup_table(results),
        "Against the baseline (ENGINE_MODE=simple) and the floor:",
        comparisons(results),
        "Targets:",
        targets(results),
    ]
    if results.get("chat"):
        parts.append(render_chat(results))
    return "\n\n".join(parts)


def fmt_load(values: Any) -> str:
    """Load averages as 1/5/15-minute figures."""
    return "/".join(f"{v:.2f}" for v in values) if values else "-"


def render_sweep(results: dict[str, Any]) -> str:
    """The settings sweep: one row per setting, model and load."""
    rows = []
    for key, f in results["sweep"].items():
        size, setting = key.split("/", 1)
        for name, r in f["loads"].items():
            load, clients = name.split("/")
            rows.append(
                [size, setting, f"{load} x{clients}", r["tokens_per_s"], ms(r["p50_s"]), ms(r["p99_s"]), r["errors"],
                 r["server_cores"], r.get("other_cores"), f["memory_after_run"]["pss_mib"]]
            )  # fmt: skip
    header = ["model", "setting", "load", "new tok/s", "p50 ms", "p99 ms", "errors", "server cores", "other procs",
              "PSS MiB"]  # fmt: skip
    m = results["machine"]
    head = f"llmapi settings sweep, T = {results['new_tokens']}, {m['cpus']} CPUs, commit {m['commit']}, {m['started']}"
    return head + "\n\n" + table(header, rows)


def render_peers(results: dict[str, Any]) -> str:
    """llmapi beside CTranslate2 and llama-server on the small model, with the issue's targets."""
    p = results["peers"]
    ct2_int8 = p["ct2"]["int8"]["batch8"]["tokens_per_s"]
    llama = p["llama"].get("bf16", {}).get("loads", {})
    ct2_rows = [
        [f"CTranslate2 {q}", f["threads"], f["batch1"]["tokens_per_s"], f["batch8"]["tokens_per_s"]]
        for q, f in p["ct2"].items()
    ]
    rows = []
    for name, f in {**p["servers"], **{f"llama-server {k}": v for k, v in p["llama"].items()}}.items():
        for load, r in f["loads"].items():
            clients = int(load.split("/")[1])
            theirs = llama.get(load, {}).get("tokens_per_s")
            rows.append(
                [name, clients, r["tokens_per_s"], ms(r["p50_s"]), ms(r["p99_s"]), r["errors"],
                 ratio(r["tokens_per_s"], ct2_int8), ratio(r["tokens_per_s"], theirs), r.get("other_cores"),
                 f["memory_after_load"]["pss_mib"]]
            )  # fmt: skip
    header = ["server", "clients", "new tok/s", "p50 ms", "p99 ms", "errors", "x CT2 int8 b8", "x llama bf16",
              "other procs", "PSS MiB loaded"]  # fmt: skip
    m = results["machine"]
    head = f"llmapi beside its peers, small model, T = {results['new_tokens']}, {m['cpus']} CPUs, commit {m['commit']}"
    return "\n\n".join(
        [head, "In process, greedy, new tokens/s:", table(["engine", "threads", "batch 1", "batch 8"], ct2_rows),
         "Through HTTP, closed-loop clients:", table(header, rows), "Targets:", peer_targets(p)]
    )  # fmt: skip


def peer_targets(p: dict[str, Any]) -> str:
    """The issue's targets for every llmapi variant of a --peers run."""
    ct2_int8 = p["ct2"]["int8"]["batch8"]["tokens_per_s"]
    llama = p["llama"].get("bf16", {}).get("loads", {})
    before = p["servers"].get("fp32 2x1 (before)", {}).get("memory_after_load", {}).get("pss_mib")
    rows = []
    for name, f in p["servers"].items():
        if name == "baseline":
            continue
        got = {load: r for load, r in f["loads"].items()}

        def rate(load: str, got: dict[str, Any] = got) -> float | None:
            return got.get(load, {}).get("tokens_per_s")

        one, generate = got.get("greedy/1", {}), p["generate"].get(name, {}).get("generate_s")
        rows += [
            [name, "8 clients / CT2 int8 batch 8", ">= 1.0", ratio(rate("greedy/8"), ct2_int8)],
            [name, "32 clients / CT2 int8 batch 8", ">= 1.5", ratio(rate("greedy/32"), ct2_int8)],
            [name, "32 clients / llama-server bf16 32 clients", ">= 0.8", ratio(rate("greedy/32"), _rate(llama, 32))],
            [name, "1 client p50 / in-process generate (same dtype)", "<= 1.15", ratio(one.get("p50_s"), generate)],
            [name, "1 client / llama-server bf16 1 client", "report", ratio(rate("greedy/1"), _rate(llama, 1))],
            [name, "PSS after load / fp32 server before", "<= 0.6", ratio(f["memory_after_load"]["pss_mib"], before)],
        ]
    return table(["llmapi", "target", "goal", "measured"], rows)


def _rate(loads: dict[str, Any], clients: int) -> float | None:
    """tokens/s of the greedy run at `clients`, if there is one."""
    return loads.get(f"greedy/{clients}", {}).get("tokens_per_s")


def chat_table(results: dict[str, Any]) -> str:
    """Every chat workload's client groups, features on and off: throughput, TTFT, inter-token latency, memory."""
    rows = []
    for size, labels in results.get("chat", {}).items():
        for label, runs in labels.items():
            for workload, groups in runs.items():
                if workload.startswith("unique"):
                    continue
                for group, r in groups.items():
                    if not isinstance(r, dict) or "ttft_p50_s" not in r:
                        continue
                    rows.append(
                        [size, label, f"{workload}: {group}", r["clients"], r["requests"], r["tokens_per_s"],
                         ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["itl_p50_s"]), ms(r["itl_p99_s"]),
                         ms(r["itl_max_s"]), ms(r["p50_s"]), r["errors"], groups["pss_mib"],
                         groups["metrics"].get("llmapi_prefix_cache_bytes", 0) / 2**20]
                    )  # fmt: skip
    header = ["model", "cache+chunks", "workload: clients", "n", "requests", "new tok/s", "TTFT p50 ms",
              "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "latency p50 ms", "errors", "PSS MiB",
              "cache MiB"]  # fmt: skip
    return table(header, rows)


def chat_targets(results: dict[str, Any]) -> str:
    """The chat issue's targets, each with its ratio measured in one run."""
    rows = []
    for size, labels in results.get("chat", {}).items():
        on, off = labels.get("on", {}), labels.get("off", {})
        if "chat" in on and "chat" in off:
            a, b = on["chat"]["chat"], off["chat"]["chat"]
            rows.append([f"{size} chat: TTFT p50 off / on", ">= 4", ratio(b["ttft_p50_s"], a["ttft_p50_s"])])
            rows.append([f"{size} chat: new tok/s on / off", ">= 1.5", ratio(a["tokens_per_s"], b["tokens_per_s"])])
        for label, runs in labels.items():
            streams = runs.get("mixed", {}).get("streams")
            if streams:
                value = ratio(streams["itl_p99_s"], streams["itl_p50_s"])
                rows.append([f"{size} mixed, {label}: streams' ITL p99 / p50", "<= 3" if label == "on" else "-", value])
        for name in [key for key in on if key.startswith("unique")]:
            if name in off:
                value = ratio(on[name]["tokens_per_s"], off[name]["tokens_per_s"])
                rows.append([f"{size} {name}: new tok/s on / off", ">= 0.9 (noise)", value])
    for size, soak in results.get("soak", {}).items():
        samples = soak["samples"]
        if samples:
            worst = max(s["cache_mib"] - s["capacity_mib"] for s in samples)
            rows.append([f"{size} soak {soak['seconds']:.0f}s: cache MiB over capacity (max)", "<= 0", worst])
            rows.append([f"{size} soak: PSS MiB first / last sample", "flat", f"{samples[0]['pss_mib']:.0f} / "
                         f"{samples[-1]['pss_mib']:.0f}"])  # fmt: skip
    return table(["target", "goal", "measured"], rows)


def soak_table(results: dict[str, Any]) -> str:
    """The soak's samples: PSS and the prefix caches' bytes over time."""
    rows = [
        [size, s["t_s"], s["pss_mib"], s["cache_mib"], s["capacity_mib"], s["prompt_tokens"]]
        for size, soak in results.get("soak", {}).items()
        for s in soak["samples"]
    ]
    return table(["model", "t s", "PSS MiB", "cache MiB", "capacity MiB", "prompt tokens so far"], rows)


def render_chat(results: dict[str, Any]) -> str:
    """The chat workloads' part of the report (alone with --only-chat)."""
    parts = [
        "Chat workloads, prefix cache and chunked prefill on (defaults) and off (PREFIX_CACHE_MB=0"
        " PREFILL_CHUNK_TOKENS=0), one run:",
        chat_table(results),
    ]
    unique = {
        f"{size}/{label}": {"loads": {k.removeprefix("unique "): v for k, v in runs.items() if k.startswith("unique")}}
        for size, labels in results.get("chat", {}).items()
        for label, runs in labels.items()
    }
    if any(f["loads"] for f in unique.values()):
        parts += ["Unique prompts (/generate) on both servers:", server_table({"servers": unique})]
    if results.get("soak"):
        parts += ["Soak of distinct 600-token prefixes:", soak_table(results)]
    parts += ["Chat targets:", chat_targets(results)]
    return "\n\n".join(parts)


PARTING_HEADER = ["prompt", "common", "of", "llmapi's top 3 where they part", "llama's top 3"]


def parting(candidates: list[tuple[str, float]] | None) -> str:
    """Top candidates as `'tok' -1.23`, or '' where the texts never part."""
    return "  ".join(f"{token!r} {logprob:.2f}" for token, logprob in candidates or [])


def render_real(results: dict[str, Any]) -> str:
    """The real model beside llama-server on the same GGUF file: agreement, then load."""
    r = results["real"]
    m = results["machine"]
    llama = r["llama"]["loads"]
    load_rows = []
    servers = [(f"llmapi {name}", f) for name, f in r["llmapi"].items()] + [("llama-server", r["llama"])]
    for name, f in servers:
        for load, x in f["loads"].items():
            theirs = llama.get(load, {}).get("tokens_per_s")
            load_rows.append(
                [name, int(load.split("/")[1]), x["tokens_per_s"], ms(x["p50_s"]), ms(x["p99_s"]), x["errors"],
                 ratio(x["tokens_per_s"], theirs), x.get("other_cores"), f["memory_after_load"]["pss_mib"]]
            )  # fmt: skip
    head = (
        f"The real model ({Path(r['model']).name}) beside llama-server on the same file, T = {results['new_tokens']},"
        f" {m['cpus']} CPUs, commit {m['commit']}"
    )
    header = ["server", "clients", "new tok/s", "p50 ms", "p99 ms", "errors", "x llama", "other procs", "PSS MiB"]
    envs = "; ".join(f"{name}: {env or 'the defaults'}" for name, env in r.get("variants", {}).items())
    parts = [head, f"llmapi servers: {envs}"]
    if "load" in r:
        load = ", ".join(f"{name} {f['seconds']:.1f} s" for name, f in r["load"].items())
        parts.append(f"Load in a fresh process ({r['load']['first']['dtype']}): {load}")
    if "agreement" in r:
        agree = r["agreement"]
        rows = [
            [a["prompt"].replace("\n", " ")[:40], a["common"], a["of"], parting(a.get("parting", {}).get("llmapi")),
             parting(a.get("parting", {}).get("llama"))]
            for a in agree["prompts"]
        ]  # fmt: skip
        parts += [f"Greedy agreement, {agree['tokens']} tokens a prompt (common prefix, in tokens):",
                  table(PARTING_HEADER, rows)]  # fmt: skip
    return "\n\n".join([*parts, "Through HTTP, closed-loop clients:", table(header, load_rows)])

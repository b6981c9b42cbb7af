"""The benchmark as a picture: new tokens/s and p50/p99 latency against clients, per model (matplotlib, bench-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Series = dict[int, tuple[float, float | None, float | None]]  # clients -> (new tokens/s, p50 s, p99 s)


def loads(figures: dict[str, Any], load: str = "greedy") -> Series:
    """One server's greedy runs as clients -> (tokens/s, p50, p99)."""
    found: Series = {}
    for name, r in figures.get("loads", {}).items():
        kind, clients = name.split("/")
        if kind == load:
            found[int(clients)] = (r["tokens_per_s"], r["p50_s"], r["p99_s"])
    return found


def ct2(figures: dict[str, Any]) -> Series:
    """CTranslate2 in process: batch b counts as b clients, a call's time as every row's latency."""
    return {
        b: (figures[f"batch{b}"]["tokens_per_s"], figures[f"batch{b}"]["seconds"], figures[f"batch{b}"]["seconds"])
        for b in (1, 8)
    }


def series(results: dict[str, Any]) -> dict[str, dict[str, Series]]:
    """model -> label -> series, from a plain run (llmapi and its baseline) or a --peers run."""
    models: dict[str, dict[str, Series]] = {}
    for key, figures in results.get("servers", {}).items():
        size, mode = key.split("/")
        models.setdefault(size, {})["llmapi" if mode == "batch" else "baseline (one generate per request)"] = loads(
            figures
        )
    found = results.get("peers")
    if found:
        small = models.setdefault("small", {})
        for name, figures in found["servers"].items():
            label = "baseline (one generate per request)" if name == "baseline" else f"llmapi, {name}"
            small[label] = loads(figures)
        for quantization, figures in found["ct2"].items():
            small[f"CTranslate2 {quantization} (in process)"] = ct2(figures)
        for outtype, figures in found["llama"].items():
            small[f"llama.cpp llama-server {outtype}"] = loads(figures)
    return models


def draw(results: dict[str, Any], out: Path) -> Path | None:
    """Write the chart to `out` (PNG) and return it; None when the run has no load curves (--only-chat)."""
    if not series(results):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = series(results)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.6 * len(models)), squeeze=False)
    for row, (size, lines) in enumerate(sorted(models.items())):
        speed, latency = axes[row]
        for n, (label, points) in enumerate(sorted(lines.items())):
            clients = sorted(c for c in points if points[c][1] is not None)  # a window with no answer has no latency
            color = f"C{n}"
            speed.plot(clients, [points[c][0] for c in clients], "o-", color=color, label=label)
            latency.plot(clients, [points[c][1] * 1000 for c in clients], "o-", color=color, label=f"{label} p50")
            latency.plot(clients, [points[c][2] * 1000 for c in clients], "x--", color=color, alpha=0.6)
        speed.set(
            title=f"{size} model: new tokens/s", xlabel="clients (CTranslate2: batch)", xscale="log", yscale="log"
        )
        latency.set(
            title=f"{size} model: latency, p50 (o) and p99 (x), ms", xlabel="clients", xscale="log", yscale="log"
        )
        for ax in (speed, latency):
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks([1, 8, 32], labels=["1", "8", "32"])
        speed.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"llmapi benchmark, T = {results['new_tokens']}, {m['cpus']} CPUs, commit {m['commit']}, {m['started']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.chart RESULTS.json [OUT.png] (redraw a run's chart from its JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    args = parser.parse_args(argv)
    print(draw(json.loads(args.results.read_text()), args.out or args.results.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

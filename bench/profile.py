"""Where a server worker's time goes under load: `python -m bench.profile [--model tiny] [--clients 8]`.

Starts the real gunicorn, puts it under closed-loop load, samples one worker with py-spy (its threads told
apart: the engine's decoding thread, gunicorn's request threads, its main loop), and prints the share of
samples per thread kind and the heaviest functions in each, inclusive and self.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.__main__ import MODELS, bodies, ensure_models, run_python, server_settings
from bench.server import KEY, start, warm

LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


def thread_kind(root: str) -> str:
    """Name the thread a py-spy stack belongs to, from its root frames."""
    if "_run (llmapi/engine/engine.py" in root:
        return "engine thread"
    if "worker (concurrent/futures/thread.py" in root:
        return "request threads"
    if "run (gunicorn/workers/gthread.py" in root or "run_for_one" in root:
        return "gunicorn main loop"
    return "other"


def aggregate(raw: Path, top: int) -> dict[str, object]:
    """Shares per thread kind and the top functions per kind, from py-spy's raw (collapsed) output."""
    kinds: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in match["stack"].split(";")]
        count = int(match["count"])
        kind = thread_kind(";".join(frames))
        kinds[kind] += count
        for frame in set(frames):
            inclusive[kind][frame] += count
        own[kind][frames[-1]] += count
    total = sum(kinds.values()) or 1
    return {
        "samples": total,
        "threads": {k: v / total for k, v in kinds.most_common()},
        "inclusive": {k: [(f, n / total) for f, n in c.most_common(top)] for k, c in inclusive.items()},
        "self": {k: [(f, n / total) for f, n in c.most_common(top)] for k, c in own.items()},
    }


def render(profile: dict[str, object]) -> str:
    """The profile as text: thread shares, then the top functions of each thread kind."""
    lines = [f"{profile['samples']} samples of one worker (share of all its samples):"]
    for kind, share in profile["threads"].items():  # type: ignore[union-attr]
        lines.append(f"  {share:6.1%}  {kind}")
    for title in ("self", "inclusive"):
        for kind, rows in profile[title].items():  # type: ignore[union-attr]
            lines.append(f"\n{kind}, {title} time:")
            lines += [f"  {share:6.1%}  {frame}" for frame, share in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the server, load it, profile one worker, print the breakdown (and save the raw samples)."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--load", choices=("greedy", "sampled", "seeded"), default="greedy")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    args = parser.parse_args(argv)
    # The venv's scripts need not be on PATH (`.venv/bin/python -m bench.profile`).
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not spy:
        sys.exit("py-spy is not installed: pip install py-spy")
    path = ensure_models([args.model])[args.model]
    env = dict(item.split("=", 1) for item in args.env)
    server = start(path, env)
    try:
        body = bodies(32)[args.load]
        warm(server, body, server_settings(path, env).web_concurrency)
        worker = server.pids()[1]
        load = threading.Thread(
            target=run_python,
            args=("bench.load", "--url", server.url + "/generate", "--key", KEY, "--body", json.dumps(body),
                  "--clients", str(args.clients), "--warmup", "1", "--seconds", str(args.seconds + 2)),
        )  # fmt: skip
        load.start()
        time.sleep(1.5)
        raw = Path(tempfile.mkdtemp(prefix="llmapi-profile-")) / "pyspy.txt"
        subprocess.run(
            [spy, "record", "--pid", str(worker), "--duration", str(int(args.seconds)), "--rate", "200",
             "--format", "raw", "--threads", "--nonblocking", "--output", str(raw)],
            check=True, capture_output=True,
        )  # fmt: skip
        load.join()
    finally:
        server.stop()
    print(render(aggregate(raw, args.top)))
    print(f"\nraw samples: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

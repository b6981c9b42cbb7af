"""The CPU servers people compare llmapi with, set up from their own tools and measured in the same run.

- CTranslate2: the model converted by its own `ct2-transformers-converter` (int8 and fp32), greedy in one process
  at batch 1 and 8 (`python -m bench.peers ct2 --model DIR --quantization int8`, JSON on stdout).
- llama.cpp: `llama-server` built once (cached under .cache/llama.cpp/) from the llama.cpp sources that PyPI's
  `llama-cpp-python` sdist vendors, the model converted by llama.cpp's own `convert_hf_to_gguf.py` (bf16 and
  q8_0 GGUF), started on 127.0.0.1 only, and put under the same load generator as llmapi.

All of it is benchmark-only (`pip install -e .[bench]`): the service never imports any of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.server import ROOT, Server, free_port, get

CACHE = ROOT / ".cache"
LLAMA_CACHE = CACHE / "llama.cpp"
PROMPT = "Artificial Intelligence is"


def run(cmd: list[str], *, log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a set-up command, its output in `log`; fail with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{log.read_text()[-3000:]}")


def ct2_model(model: str, quantization: str) -> Path:
    """The model converted by CTranslate2's own converter (cached)."""
    out = CACHE / "ct2" / f"{Path(model).name}-{quantization}"
    if not (out / "model.bin").exists():
        converter = Path(sys.executable).parent / "ct2-transformers-converter"
        cmd = [str(converter), "--model", model, "--output_dir", str(out), "--quantization", quantization, "--force"]
        run(cmd, log=CACHE / "ct2" / "convert.log")
    return out


def ct2_rates(model: str, *, quantization: str, threads: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """CTranslate2 greedy at batch 1 and 8 on its conversion of `model`: new tokens/s, median seconds a call."""
    import ctranslate2
    from transformers import AutoTokenizer

    path = ct2_model(model, quantization)
    tokenizer = AutoTokenizer.from_pretrained(model)
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type=quantization, intra_threads=threads)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(PROMPT))
    figures: dict[str, Any] = {"quantization": quantization, "threads": threads}
    for batch in (1, 8):

        def call(batch: int = batch) -> None:
            generator.generate_batch(
                [tokens] * batch,
                max_length=new_tokens,
                min_length=new_tokens,
                sampling_topk=1,
                include_prompt_in_result=False,
            )

        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        figures[f"batch{batch}"] = {"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds}
    return figures


def llmapi_generate(model: str, *, env: dict[str, str], threads: int, new_tokens: int, repeats: int) -> dict:
    """One in-process `model.generate` at batch 1, T new tokens, in the dtype the server's settings give."""
    import torch

    from llmapi.engine import create_engine

    engine = create_engine(
        model,
        torch_threads=threads,
        engine_mode="simple",
        dtype=env.get("DTYPE", "auto"),
        quantization=env.get("QUANTIZATION", "none"),
    )
    ids = torch.tensor([engine.encode(PROMPT)])
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.inference_mode():
        engine.loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
            times.append(time.perf_counter() - started)
    return {"dtype": engine.placement["dtype"], "threads": threads, "generate_s": statistics.median(times)}


def llama_source() -> Path:
    """llama.cpp's sources as PyPI's llama-cpp-python sdist vendors them (downloaded and unpacked once)."""
    found = sorted(LLAMA_CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
    run([*pip, "-d", str(LLAMA_CACHE)], log=LLAMA_CACHE / "download.log")
    [sdist] = sorted(LLAMA_CACHE.glob("llama_cpp_python-*.tar.gz"))[-1:]
    with tarfile.open(sdist) as archive:
        archive.extractall(LLAMA_CACHE, filter="data")
    return sorted(LLAMA_CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def llama_server() -> Path:
    """The llama-server binary, built once for this CPU without AMX (about 10 minutes on 2 cores)."""
    source = llama_source()
    build = source / "build-noamx"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    print("building llama.cpp's llama-server (once; ~10 min on 2 cores) ...", file=sys.stderr)
    # -march=native minus AMX: on a Xeon that has it (this VM's, 2026-12), llama.cpp's AMX matmul faulted at the
    # first forward (ldtilecfg in ggml_backend_amx_mul_mat, the server killed by a signal) although a minimal AMX
    # program ran; its AVX-512 paths (VNNI, BF16) stay. Explicit -mno-* flags win over -march=native in GCC.
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DGGML_NATIVE=ON"]
    configure += ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    configure += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    run(configure, log=LLAMA_CACHE / "cmake.log")
    jobs = str(os.cpu_count() or 2)
    run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
        log=LLAMA_CACHE / "build.log",
    )
    return binary


CONVERT = """
import sys
sys.argv = sys.argv[1:]
sys.path.insert(0, {source!r})
import convert_hf_to_gguf
from conversion.base import TextModel
# Our offline tokenizer is byte-level BPE with GPT-2's pre-tokenizer, which the converter's fingerprints of
# published tokenizers cannot know: name it.
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
convert_hf_to_gguf.main()
"""


def gguf(model: str, outtype: str) -> Path:
    """The model converted to GGUF by llama.cpp's own convert_hf_to_gguf.py (cached); outtype bf16 or q8_0."""
    out = LLAMA_CACHE / "gguf" / f"{Path(model).name}-{outtype}.gguf"
    if out.exists():
        return out
    source = llama_source()
    # GPT-2 configs there need n_ctx (transformers' GPT2Config calls it n_positions): a copy with both.
    staged = LLAMA_CACHE / "gguf" / f"{Path(model).name}-hf"
    shutil.copytree(model, staged, dirs_exist_ok=True)
    config = json.loads((staged / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions", 1024))
    (staged / "config.json").write_text(json.dumps(config, indent=1))
    script = CONVERT.format(source=str(source))
    cmd = [sys.executable, "-c", script, "convert", str(staged), "--outfile", str(out), "--outtype", outtype]
    run(cmd, log=LLAMA_CACHE / "gguf" / f"convert-{outtype}.log", cwd=source)
    return out


def start_llama(model: Path, *, threads: int, parallel: int, timeout: float = 120.0) -> Server:
    """Start llama-server on 127.0.0.1 with `parallel` slots; return it once /health answers 200."""
    port = free_port()
    log_path = LLAMA_CACHE / f"server-{port}.log"
    cmd = [str(llama_server()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(1024 * parallel), "--no-webui"]
    launched = time.perf_counter()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    while get(server.url + "/health", timeout=1.0) != 200:
        if process.poll() is not None or time.perf_counter() - launched > timeout:
            server.stop()
            raise RuntimeError(f"llama-server did not come up:\n{server.log()[-2000:]}")
        time.sleep(0.1)
    server.health_s = time.perf_counter() - launched
    return server


def llama_body(new_tokens: int) -> dict[str, Any]:
    """The /v1/completions body that asks llama-server for exactly `new_tokens` greedy tokens."""
    return {"prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.peers ct2|generate --model DIR ...; JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("what", choices=("ct2", "generate"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--env", default="{}", help="the llmapi server's settings (JSON), for `generate`")
    args = parser.parse_args(argv)
    if args.what == "ct2":
        result = ct2_rates(
            args.model,
            quantization=args.quantization,
            threads=args.threads,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    else:
        result = llmapi_generate(
            args.model, env=json.loads(args.env), threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

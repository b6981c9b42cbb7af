"""A GGUF file as MODEL_NAME: converted once into a Hugging Face folder, cached by its content, mapped after.

transformers reads GGUF files itself (`from_pretrained(folder, gguf_file=name)`, its own list of architectures and
quantization types) but dequantizes every weight on each load: ~20 s and a float32 copy of the whole model. So the
first load converts the file into a standard folder (safetensors in the dtype the server runs, the tokenizer, the
chat template, a generation config that names every end-of-turn token) under a cache folder named after the file's
SHA-256, and every later load, worker and restart reads that folder like any other checkpoint.

The folder is written under a temporary name and renamed into place, with a marker file written last: a folder
without the marker is never used. An exclusive lock per digest lets one process convert while others wait for it.
This module imports only the standard library at the top, so that the image's build stage can run it on its own
(`python from_gguf.py FILE --out DIR`), as it runs build_model.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
MAGIC = b"GGUF"
MARKER = "llmapi-gguf.json"  # written last: a cache folder without it is a half-written one
# Tokens that end a turn in the chat formats of the GGUF families transformers reads (ChatML, Llama 3, Gemma, Phi):
# each one present in the vocabulary joins the generation config's eos_token_id, so that the engine stops on it.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")


class GGUFError(ValueError):
    """A GGUF file that cannot be served: missing, not GGUF, or refused by transformers' reader."""


def is_gguf(name: str) -> bool:
    """Whether MODEL_NAME names a GGUF file (by its suffix, as llama.cpp and transformers do)."""
    return name.lower().endswith(SUFFIX)


def check_file(path: str) -> None:
    """Refuse a path that is not a readable GGUF file, saying which and why."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read the GGUF file ({exc.strerror or exc})") from None
    if head != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}, not {MAGIC!r})")


def digest(path: str) -> str:
    """The file's SHA-256, hex: the cache key (a renamed or copied file keeps its conversion)."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def cache_folder(path: str, sha256: str, *, dtype: str, root: str | Path) -> Path:
    """Where the conversion of `path` (whose digest is `sha256`) to `dtype` lives under `root`."""
    return Path(root) / f"{Path(path).stem}-{sha256[:16]}-{dtype}"


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished conversion (its marker is written last)."""
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (advisory, released when the process dies)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(path: str, *, dtype: str, root: str | Path) -> tuple[Path, bool]:
    """Return the cached folder of `path` in `dtype`, converting it first if no process has; and whether this did."""
    check_file(path)
    sha256 = digest(path)
    target = cache_folder(path, sha256, dtype=dtype, root=root)
    if is_complete(target):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process converted it while this one waited for the lock
            return target, False
        partial = target.parent / f".{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a crashed conversion's leftovers: nobody else holds the lock
        started = time.perf_counter()
        convert(path, partial, dtype=dtype, sha256=sha256)
        shutil.rmtree(target, ignore_errors=True)  # a folder without its marker was never complete
        os.rename(partial, target)
        log.info("pid=%d converted %s to %s in %.1fs", os.getpid(), path, target, time.perf_counter() - started)
    return target, True


def convert(path: str, out: str | Path, *, dtype: str, sha256: str = "") -> None:
    """Read `path` with transformers' GGUF loader and write it to `out` as a Hugging Face folder in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tensor in a server's log says nothing the log line after does
    check_file(path)
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except Exception as exc:  # transformers' reader raises many types: a corrupt file, an unsupported architecture
        reason = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise GGUFError(f"{path}: transformers could not read it: {reason}") from exc
    # The weights are plain tensors now; transformers only refuses to save what its GGUF quantizer loaded.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _name_end_of_turn(model, tokenizer)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {"source": os.path.abspath(path), "sha256": sha256 or digest(path), "dtype": dtype}
    (out / MARKER).write_text(json.dumps(facts, indent=2) + "\n")


def _name_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Put every end-of-turn token of the vocabulary in the generation config's eos_token_id."""
    found = model.generation_config.eos_token_id
    ids = list(found) if isinstance(found, list) else [found] if found is not None else []
    vocabulary = tokenizer.get_vocab()
    for token in (tokenizer.eos_token, *END_OF_TURN):
        token_id = vocabulary.get(token) if token else None
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    model.generation_config.eos_token_id = ids


def main(argv: list[str] | None = None) -> None:
    """Convert a GGUF file: into the server's cache as its first load would (--cache), or into a folder (--out)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("gguf", help="the .gguf file")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", help="the server's GGUF_CACHE_DIR: convert for DEVICE and DTYPE as a worker would")
    where.add_argument("--out", help="a folder to write (replaced if it exists); the image's build stage uses this")
    parser.add_argument("--dtype", default="auto", help="auto (as the server chooses), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (--cache only)")
    parser.add_argument("--quantization", default="none", help="auto, none, int4 or int8 (--cache only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cache:
        from llmapi.engine.loader import gguf_folder

        folder, _ = gguf_folder(
            args.gguf, device=args.device, dtype=args.dtype, quantization=args.quantization, cache_dir=args.cache
        )
        print(folder)
        return
    partial = Path(args.out).with_name(Path(args.out).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    convert(args.gguf, partial, dtype="bfloat16" if args.dtype == "auto" else args.dtype)
    shutil.rmtree(args.out, ignore_errors=True)
    os.rename(partial, args.out)
    print(args.out)


if __name__ == "__main__":
    main()

"""Facts of a checkpoint read from its files alone (no torch, no download): how many parameters it holds, and
the number format of a GGUF file's weights.

gunicorn's master decides how many workers to fork before any of them loads the model, and it must stay light
(no torch), so the parameter count comes from the safetensors headers: eight bytes of length, then a JSON table of
every tensor's dtype and shape. A hub id is looked up in the local Hugging Face cache only; a model not there yet
(or stored only as a pickle) is counted from its file size, or not at all.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
HEADER_LIMIT = 100 * 1024 * 1024  # the format's own cap on a header's size
# llama.cpp's llama_ftype values whose weights take 4 bits or fewer: Q4_0, Q4_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, the
# IQ1 to IQ4 types and Q2_K_S. QUANTIZATION=auto serves these files' weights in int4 (config.py).
GGUF_FOUR_BIT_OR_LESS = frozenset({2, 3, 10, 11, 12, 13, 14, 15, *range(19, 32)})
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def _local(name: str, filename: str, revision: str | None) -> Path | None:
    """The path of `filename` of model `name`: in its directory, or in the hub cache; None where absent."""
    if os.path.isdir(name):
        path = Path(name) / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        return None
    found = try_to_load_from_cache(name, filename, revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def safetensors_parameters(path: Path) -> int:
    """Count the values in one safetensors file from its header (every tensor's shape)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > HEADER_LIMIT:
            raise ValueError(f"{path}: a safetensors header of {length} bytes")
        header = json.loads(file.read(length))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


@functools.lru_cache(maxsize=8)
def parameters(name: str, revision: str | None = None) -> int | None:
    """The parameters of model `name` (a directory or a cached hub id); None when its files are not here."""
    try:
        if name.lower().endswith(".gguf"):
            # Quantized blocks hold a weight in 4.5 to 32 bits: 4 bytes a weight is a lower bound (engine/from_gguf.py).
            return os.path.getsize(name) // 4
        index = _local(name, SAFETENSORS_INDEX, revision)
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [_local(name, shard, revision) for shard in shards]
            if all(paths):
                return sum(safetensors_parameters(path) for path in paths if path)
            return None
        single = _local(name, SAFETENSORS, revision)
        if single is not None:
            return safetensors_parameters(single)
        pickle = _local(name, PICKLE, revision)
        # Pickled checkpoints are mostly fp32: 4 bytes a parameter (an fp16 one is counted at half its size).
        return pickle.stat().st_size // 4 if pickle is not None else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):  # unreadable: decide as for an unknown model
        return None


def gguf_file_type(path: str) -> int | None:
    """The `general.file_type` of a GGUF file (llama.cpp's llama_ftype: 3 is Q4_1), read from its header; None
    where the file is unreadable or does not say.

    The key sits among the first few of the header, before the vocabulary's arrays, so the read stops there.
    """
    try:
        with open(path, "rb") as file:
            magic, _version, _tensors, count = struct.unpack("<4sIQQ", file.read(24))
            if magic != b"GGUF":
                return None
            for _ in range(count):
                key = _gguf_string(file)
                (kind,) = struct.unpack("<I", file.read(4))
                value = _gguf_value(file, kind)
                if key == "general.file_type":
                    return int(value) if isinstance(value, int) else None
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return None


def _gguf_string(file: Any) -> str:
    """A GGUF string: eight bytes of length, then UTF-8."""
    (length,) = struct.unpack("<Q", file.read(8))
    if length > HEADER_LIMIT:
        raise ValueError(f"a GGUF string of {length} bytes")
    return file.read(length).decode("utf-8", errors="replace")


def _gguf_value(file: Any, kind: int) -> Any:
    """One header value of type `kind`: a scalar or a string is read, an array skipped (None)."""
    if kind == GGUF_STRING:
        return _gguf_string(file)
    if kind == GGUF_ARRAY:
        item, count = struct.unpack("<IQ", file.read(12))
        if item in GGUF_SCALARS:
            file.seek(struct.calcsize("<" + GGUF_SCALARS[item]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_value(file, item)
        return None
    code = "<" + GGUF_SCALARS[kind]
    return struct.unpack(code, file.read(struct.calcsize(code)))[0]


def quantization_for(name: str, *, on_gpu: bool, dtype: str) -> str:
    """What QUANTIZATION=auto means for model `name`: int4 for a GGUF file whose weights take 4 bits or fewer,
    served on a CPU in bf16 (its own values in a quarter of bf16's bytes: docs/performance.md); else none."""
    if on_gpu or dtype not in ("auto", "bfloat16") or not name.lower().endswith(".gguf"):
        return "none"
    return "int4" if gguf_file_type(name) in GGUF_FOUR_BIT_OR_LESS else "none"

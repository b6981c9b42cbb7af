"""Facts of a checkpoint read from its files alone (no torch, no download): how many parameters it holds.

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

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
HEADER_LIMIT = 100 * 1024 * 1024  # the format's own cap on a header's size


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

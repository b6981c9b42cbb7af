"""The model side: loading, batching and decoding. Importing this package imports no torch."""

import gc
import os
from typing import Any

from llmapi.engine.config import EngineConfig
from llmapi.engine.types import (
    ContextLengthExceeded,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
)

__all__ = [
    "ContextLengthExceeded",
    "EngineConfig",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "ModelUnavailable",
    "create_engine",
    "start_engine",
]


def create_engine(model_name: str, **options: Any):  # -> Engine; loosely typed: this package imports no torch
    """Load `model_name` and start an engine on it; `options` are EngineConfig's fields. Imports torch."""
    return start_engine(EngineConfig(model_name=model_name, **options))


def start_engine(config: EngineConfig):  # -> llmapi.engine.engine.Engine, or the simple one
    """Load the model `config` names on its device in its dtype and start an engine on it (ENGINE_MODE "batch", or
    "simple": the baseline). Imports torch."""
    # The Rust tokenizer's own thread pool must not start in a process that serves threads of its own.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmapi.engine.engine import Engine
    from llmapi.engine.loader import load, on_a_thread_of_its_own, set_threads
    from llmapi.engine.tuning import keep_freed_memory, release_freed_memory

    keep_freed_memory()
    set_threads(config.torch_threads)
    loaded = on_a_thread_of_its_own(
        load,
        config.model_name,
        revision=config.model_revision or None,
        device=config.device,
        dtype=config.dtype,
        quantization=config.quantization,
        gguf_cache_dir=config.gguf_cache_dir,
    )
    gc.collect()  # the fp32 copies that bf16 or int4/int8 replaced, before their pages go back
    release_freed_memory()
    if config.engine_mode == "simple":
        from llmapi.engine.simple import SimpleEngine

        return SimpleEngine(loaded)
    # Built on a thread that ends, as the load is: the lean pass joins int4 layers and probes them (lean.py), and a
    # parallel operation on this thread would leave it an OpenMP team beside the engine thread's (loader.py), which
    # made the one-row step twice as long.
    return on_a_thread_of_its_own(Engine, loaded, config)

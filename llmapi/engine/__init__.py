"""The model side: loading, batching and decoding. Importing this package imports no torch."""

import gc
import os

from llmapi.engine.types import (
    ContextLengthExceeded,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
)

__all__ = [
    "ContextLengthExceeded",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "ModelUnavailable",
    "create_engine",
]


def create_engine(
    model_name: str,
    *,
    revision: str | None = None,
    threads: int = 1,
    max_batch_size: int = 8,
    batch_wait_ms: float = 2.0,
    prefix_cache_mb: float = 0.0,
    prefix_cache_block_tokens: int = 16,
    prefill_chunk_tokens: int = 0,
    mode: str = "batch",
    device: str = "auto",
    dtype: str = "auto",
    quantization: str = "none",
    gguf_cache_dir: str = "",
):  # -> llmapi.engine.batching.Engine, typed loosely so that importing this package stays torch-free
    """Load `model_name` on `device` in `dtype` and start an engine on it (mode "batch", or "simple": the baseline).

    `prefix_cache_mb` bounds the batching engine's prefix cache (0: off); `prefill_chunk_tokens` is the most prompt
    tokens one row reads per engine step (0: a whole prompt at once). Imports torch.
    """
    # The Rust tokenizer's own thread pool must not start in a process that serves threads of its own.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmapi.engine.batching import Engine
    from llmapi.engine.loader import load, set_threads
    from llmapi.engine.tuning import keep_freed_memory, release_freed_memory

    keep_freed_memory()
    set_threads(threads)
    loaded = load(
        model_name,
        revision=revision,
        device=device,
        dtype=dtype,
        quantization=quantization,
        gguf_cache_dir=gguf_cache_dir,
    )
    gc.collect()  # the fp32 copies that bf16 or int8 replaced, before their pages go back
    release_freed_memory()
    if mode == "simple":
        from llmapi.engine.simple import SimpleEngine

        return SimpleEngine(loaded)
    return Engine(
        loaded,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        prefix_cache_mb=prefix_cache_mb,
        block_tokens=prefix_cache_block_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
    )

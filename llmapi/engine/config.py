"""EngineConfig: the engine's settings, declared once, named as the service's Settings (and so the environment)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EngineConfig:
    """What an engine is made with: the model, where and how it runs, and how it batches (no torch here)."""

    model_name: str
    model_revision: str = ""  # hub revision; "" = the default branch
    torch_threads: int = 1  # torch threads of this process
    max_batch_size: int = 8  # most rows decoded together
    batch_wait_ms: float = 2.0  # how long a new batch waits for company
    prefix_cache_mb: float = 0.0  # memory of the prefix cache; 0 = off
    prefix_cache_block_tokens: int = 16  # tokens per prefix-cache block
    prefill_chunk_tokens: int = 0  # most prompt tokens one row reads per engine step; 0 = a whole prompt at once
    max_prefill_tokens: int = 8192  # admitted prompt tokens still unread past which no more rows are admitted
    engine_mode: str = "batch"  # "batch", or "simple": transformers' generate, one request at a time (the baseline)
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    speculation: str = "off"  # "off", "ngram" or "auto": prompt-lookup drafts verified in one pass (speculation.py)
    speculative_tokens: int = 3  # most draft tokens a row proposes per step
    speculation_ngram_max: int = 3  # longest n-gram looked up
    speculation_ngram_min: int = 2  # shortest n-gram looked up
    speculation_max_rows: int = 1  # lanes of more rows take plain steps
    gguf_cache_dir: str = ""  # where a GGUF MODEL_NAME is converted once (engine/from_gguf.py)

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        """The engine's part of the service's Settings (resolved at start: no automatic 0 left), field for field."""
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})

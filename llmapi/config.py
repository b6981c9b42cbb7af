"""Settings read from the environment: the one place that does, checked once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmapi import checkpoint
from llmapi.cpus import available_cpus, nvidia_gpu_visible

DEFAULT_MODEL = "sshleifer/tiny-gpt2"
# Per worker: about 7,000 tokens of the 124M model's KV (a dozen 600-token system prompts); two workers' 1 GiB is
# small beside a 24 GiB, 2-core machine and fits the 4 GiB pod of deploy/k8s (docs/performance.md).
DEFAULT_PREFIX_CACHE_MB = 512
ENGINE_MODES = ("batch", "simple")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int4", "int8")
SPECULATION_MODES = ("off", "ngram", "auto")  # llmapi/engine/speculation.py
MAX_SPECULATIVE_TOKENS = 32
# From this size up a CPU serves with one worker that gives all its cores to one forward pass of a larger batch: a
# step is arithmetic there, which torch's threads share, and one copy of the weights halves memory. Below it a step
# is Python overhead (the 100K-parameter tiny model), which only a second process (a second GIL) runs in parallel.
# The bf16 threshold, for the same reason (llmapi/engine/precision.py); the sweep in docs/performance.md.
ONE_WORKER_MIN_PARAMETERS = 3_000_000
ONE_WORKER_BATCH = 32  # rows one worker decodes at most when it serves alone
SHARED_BATCH = 8  # per worker when several share the machine


class ConfigError(ValueError):
    """A setting is missing or has a value the service cannot run with."""


def _int(name: str, raw: str) -> int:
    """Parse a whole number or explain which variable is wrong."""
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _float(name: str, raw: str) -> float:
    """Parse a number or explain which variable is wrong."""
    try:
        return float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _bool(name: str, raw: str) -> bool:
    """Parse 1/0, true/false, yes/no, on/off."""
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _str(name: str, raw: str) -> str:
    """Keep a string as it is, stripped."""
    return raw.strip()


def _keys(name: str, raw: str) -> tuple[str, ...]:
    """Split a comma-separated key list, dropping blanks."""
    return tuple(key.strip() for key in raw.split(",") if key.strip())


PARSERS: dict[Any, Callable[[str, str], Any]] = {
    int: _int,
    float: _float,
    bool: _bool,
    str: _str,
    "int": _int,
    "float": _float,
    "bool": _bool,
    "str": _str,
    "str | None": _str,
}


def env(name: str, default: Any = None, *, doc: str = "") -> Any:
    """Declare a setting read from the environment variable `name`."""
    return field(default=default, metadata={"env": name, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told, with the environment variable that tells it."""

    api_key: str = env("API_KEY", "", doc="the API key clients send in x-api-key (required)")
    api_keys: str = env("API_KEYS", "", doc="more accepted keys, comma-separated (key rotation)")
    model_name: str = env(
        "MODEL_NAME", DEFAULT_MODEL, doc="hub id, local Hugging Face directory, or a .gguf file (converted once)"
    )
    model_revision: str = env("MODEL_REVISION", "", doc="hub revision (branch, tag or commit)")
    model_retry_seconds: float = env(
        "MODEL_RETRY_SECONDS", 10.0, doc="after a failed load, answer 503 this long before trying again"
    )
    max_new_tokens_default: int = env("MAX_NEW_TOKENS_DEFAULT", 40, doc="max_new_tokens when a request has none")
    max_new_tokens_limit: int = env("MAX_NEW_TOKENS_LIMIT", 512, doc="largest max_new_tokens accepted")
    max_prompt_chars: int = env("MAX_PROMPT_CHARS", 16_000, doc="longest prompt accepted, in characters")
    max_body_bytes: int = env("MAX_BODY_BYTES", 262_144, doc="largest request body accepted (413 above)")
    request_read_timeout: float = env(
        "REQUEST_READ_TIMEOUT", 10.0, doc="seconds a client has to send a whole request, headers and body (then 408)"
    )
    max_connections: int = env(
        "MAX_CONNECTIONS", 1000, doc="open connections per worker (gunicorn's worker_connections); more wait unaccepted"
    )
    timeout_default_ms: int = env("GENERATION_TIMEOUT_MS", 60_000, doc="generation deadline when a request sets none")
    timeout_max_ms: int = env("GENERATION_TIMEOUT_MAX_MS", 120_000, doc="largest timeout_ms a request may ask for")
    torch_threads: int = env("TORCH_THREADS", 0, doc="torch threads per worker; 0 = cores / workers")
    max_batch_size: int = env(
        "MAX_BATCH_SIZE", 0, doc="most sequences decoded together in one worker; 0 = 32 with one worker, else 8"
    )
    batch_wait_ms: float = env("BATCH_WAIT_MS", 2.0, doc="how long a new batch waits for company")
    web_concurrency: int = env(
        "WEB_CONCURRENCY",
        0,
        doc="gunicorn worker processes, each with its own model; 0 = 1 on a GPU or for a model of 3M parameters"
        " or more on a CPU, else 2",
    )
    prefix_cache_mb: int = env(
        "PREFIX_CACHE_MB",
        DEFAULT_PREFIX_CACHE_MB,
        doc="MiB of prompt-prefix KV cache per worker, reused by prompts that start alike; 0 = off",
    )
    prefix_cache_block_tokens: int = env(
        "PREFIX_CACHE_BLOCK_TOKENS", 16, doc="tokens per prefix-cache block (a prefix is reused in whole blocks)"
    )
    prefill_chunk_tokens: int = env(
        "PREFILL_CHUNK_TOKENS",
        64,
        doc="a longer prompt is read this many tokens per step, between the running rows' steps; 0 = at once",
    )
    speculation: str = env(
        "SPECULATION",
        "off",
        doc="off, ngram (draft tokens looked up in the row's own text, verified in one pass) or auto (ngram, and a"
        " row whose drafts keep missing rests)",
    )
    speculative_tokens: int = env("SPECULATIVE_TOKENS", 3, doc="most draft tokens a row proposes per step")
    speculation_ngram_max: int = env("SPECULATION_NGRAM_MAX", 3, doc="longest n-gram of a row's last tokens looked up")
    speculation_ngram_min: int = env("SPECULATION_NGRAM_MIN", 2, doc="shortest n-gram looked up")
    speculation_max_rows: int = env(
        "SPECULATION_MAX_ROWS", 1, doc="only lanes of at most this many rows speculate (more take plain steps)"
    )
    max_prefill_tokens: int = env(
        "MAX_PREFILL_TOKENS",
        8192,
        doc="per worker: admitted prompt tokens not yet read past which new prompts wait (requests take turns)",
    )
    threads: int = env("GUNICORN_THREADS", 64, doc="gunicorn threads per worker (concurrent requests)")
    bind: str = env("BIND", "0.0.0.0:8000", doc="address gunicorn listens on")
    log_level: str = env("LOG_LEVEL", "info", doc="debug, info, warning or error")
    served_model_name: str = env(
        "SERVED_MODEL_NAME", "", doc="the model id of the /v1 API (what /v1/models lists); empty = MODEL_NAME"
    )
    openai_max_choices: int = env(
        "OPENAI_MAX_CHOICES", 8, doc="most sequences one /v1 request may ask for (prompts x n)"
    )
    warmup: bool = env("WARMUP", False, doc="load the model in the background as soon as a worker starts")
    max_inflight: int = env(
        "MAX_INFLIGHT_REQUESTS", 0, doc="generating requests one worker admits at once; 0 = GUNICORN_THREADS - 1"
    )
    metrics_key: str = env("METRICS_KEY", "", doc="keys that may read /metrics, comma-separated; empty = open")
    metrics_dir: str = env(
        "PROMETHEUS_MULTIPROC_DIR", "", doc="where workers keep their metrics; empty = a temporary directory"
    )
    log_format: str = env("LOG_FORMAT", "text", doc="text or json (one JSON object per line)")
    log_prompts: bool = env("LOG_PROMPTS", False, doc="put prompt text in the log (never by default)")
    trusted_proxy_hops: int = env("TRUSTED_PROXY_HOPS", 0, doc="proxies in front whose X-Forwarded-* to trust")
    engine_mode: str = env(
        "ENGINE_MODE", "batch", doc="batch (continuous batching) or simple (one generate per request: the baseline)"
    )
    dtype: str = env(
        "DTYPE", "auto", doc="auto, float32, bfloat16 or float16; auto = bf16 where it is native and pays, else fp32"
    )
    device: str = env("DEVICE", "auto", doc="auto (cuda when a GPU is there, else cpu), cpu, cuda or cuda:N")
    quantization: str = env(
        "QUANTIZATION",
        "auto",
        doc="none; int4: 4-bit weights in groups of 32 (a GGUF Q4_1 file's own), or int8: int8 weights per channel;"
        " both weight-only, activations in bf16, CPU only; auto = int4 for a GGUF file of 4-bit (or fewer) weights"
        " on a CPU, else none",
    )
    gguf_cache_dir: str = env(
        "GGUF_CACHE_DIR",
        "",
        doc="where a .gguf MODEL_NAME is converted to a Hugging Face folder, once per file and dtype;"
        " empty = ~/.cache/llmapi/gguf",
    )
    embeddings_pooling: str = env(
        "EMBEDDINGS_POOLING",
        "last",
        doc="/v1/embeddings: last (the last token's hidden state) or mean (of all of them); normalized",
    )

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key, primary first."""
        return _keys("API_KEY", self.api_key) + _keys("API_KEYS", self.api_keys)

    @property
    def metrics_keys(self) -> tuple[str, ...]:
        """The keys that may read /metrics; none means open."""
        return _keys("METRICS_KEY", self.metrics_key)

    @property
    def admission_limit(self) -> int:
        """Generation requests one worker admits at once: always fewer than its threads."""
        return self.max_inflight or self.threads - 1

    def resolved(self) -> Settings:
        """These settings with the automatic choices (0) made, once: the I/O they need (a GPU probe, checkpoint
        headers, the CPU quota) is done here, at start, and never again.

        WEB_CONCURRENCY: one worker on a GPU or for a model of real size, else 2. MAX_BATCH_SIZE: 32 for a worker
        alone, 8 for each of several. TORCH_THREADS: the CPUs this process may use, divided among the workers.
        """
        on_gpu = self.device.startswith("cuda") or (self.device == "auto" and nvidia_gpu_visible())
        workers = self.web_concurrency or _auto_workers(self, on_gpu=on_gpu)
        return replace(
            self,
            web_concurrency=workers,
            max_batch_size=self.max_batch_size or (ONE_WORKER_BATCH if workers == 1 else SHARED_BATCH),
            # A container's CPU limit counts, not the host's cores.
            torch_threads=self.torch_threads or max(1, available_cpus() // workers),
            gguf_cache_dir=self.gguf_cache_dir or str(Path.home() / ".cache" / "llmapi" / "gguf"),
            quantization=_auto_quantization(self, on_gpu=on_gpu),
        )

    @property
    def served_model(self) -> str:
        """The model id clients name on /v1."""
        return self.served_model_name or self.model_name

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from `environ` (default os.environ), apply overrides, and check them."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name in environ:
                values[f.name] = PARSERS[f.type](name, environ[name])
        settings = replace(cls(**values), **overrides)
        settings.check()
        return settings.resolved()

    def check(self) -> None:
        """Refuse values the service cannot run with, naming the variable to fix."""
        if not self.keys:
            raise ConfigError("no API key configured: set API_KEY (and optionally API_KEYS) in the environment")
        if not self.model_name:
            raise ConfigError("MODEL_NAME is empty: set a hub id or a local model directory")
        positive = {
            "MAX_NEW_TOKENS_LIMIT": self.max_new_tokens_limit,
            "MAX_PROMPT_CHARS": self.max_prompt_chars,
            "MAX_BODY_BYTES": self.max_body_bytes,
            "GENERATION_TIMEOUT_MAX_MS": self.timeout_max_ms,
            "GUNICORN_THREADS": self.threads,
            "OPENAI_MAX_CHOICES": self.openai_max_choices,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not 1 <= self.max_new_tokens_default <= self.max_new_tokens_limit:
            raise ConfigError(
                f"MAX_NEW_TOKENS_DEFAULT must be between 1 and MAX_NEW_TOKENS_LIMIT ({self.max_new_tokens_limit}),"
                f" got {self.max_new_tokens_default}"
            )
        if not 1 <= self.timeout_default_ms <= self.timeout_max_ms:
            raise ConfigError(
                f"GENERATION_TIMEOUT_MS must be between 1 and GENERATION_TIMEOUT_MAX_MS ({self.timeout_max_ms}),"
                f" got {self.timeout_default_ms}"
            )
        if min(self.torch_threads, self.max_batch_size, self.batch_wait_ms, self.model_retry_seconds) < 0:
            raise ConfigError("TORCH_THREADS, MAX_BATCH_SIZE, BATCH_WAIT_MS, MODEL_RETRY_SECONDS must not be negative")
        self._check_model()
        self._check_prefill()
        self._check_speculation()
        if self.engine_mode not in ENGINE_MODES:
            raise ConfigError(f"ENGINE_MODE must be batch or simple, got {self.engine_mode!r}")
        if self.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ConfigError(f"LOG_LEVEL must be debug, info, warning or error, got {self.log_level!r}")
        self._check_operations()

    def _check_model(self) -> None:
        """Refuse a dtype, device or quantization the loader does not know."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"DTYPE must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"DEVICE must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.web_concurrency < 0:
            raise ConfigError(
                f"WEB_CONCURRENCY must be at least 1 (0 = chosen for the model and device), got {self.web_concurrency}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization not in ("auto", "none") and self.dtype not in ("auto", "bfloat16"):
            raise ConfigError(
                f"QUANTIZATION={self.quantization} computes in bfloat16 (weight-only): DTYPE={self.dtype} cannot go"
                " with it (leave DTYPE auto)"
            )
        if self.quantization not in ("auto", "none") and self.device.startswith("cuda"):
            raise ConfigError(
                f"QUANTIZATION={self.quantization} runs torch's CPU kernels: it does not run with DEVICE=cuda"
            )

    def _check_prefill(self) -> None:
        """Refuse prefix-cache and chunking settings the engine cannot use."""
        if self.prefix_cache_mb < 0:
            raise ConfigError(
                f"PREFIX_CACHE_MB must not be negative (0 turns the cache off), got {self.prefix_cache_mb}"
            )
        if not 1 <= self.prefix_cache_block_tokens <= 1024:
            raise ConfigError(
                f"PREFIX_CACHE_BLOCK_TOKENS must be between 1 and 1024, got {self.prefix_cache_block_tokens}"
            )
        if self.prefill_chunk_tokens < 0:
            raise ConfigError(
                f"PREFILL_CHUNK_TOKENS must not be negative (0 reads a prompt at once), got {self.prefill_chunk_tokens}"
            )
        if self.max_prefill_tokens < 1:
            raise ConfigError(
                f"MAX_PREFILL_TOKENS must be at least 1 (a longer prompt is still admitted alone), got"
                f" {self.max_prefill_tokens}"
            )

    def _check_speculation(self) -> None:
        """Refuse a speculation mode or size the engine cannot use."""
        if self.speculation not in SPECULATION_MODES:
            raise ConfigError(f"SPECULATION must be one of {', '.join(SPECULATION_MODES)}, got {self.speculation!r}")
        if not 1 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"SPECULATIVE_TOKENS must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {self.speculative_tokens}"
            )
        if not 1 <= self.speculation_ngram_min <= self.speculation_ngram_max:
            raise ConfigError(
                "SPECULATION_NGRAM_MIN must be at least 1 and at most SPECULATION_NGRAM_MAX"
                f" ({self.speculation_ngram_max}), got {self.speculation_ngram_min}"
            )
        if self.speculation_max_rows < 1:
            raise ConfigError(f"SPECULATION_MAX_ROWS must be at least 1, got {self.speculation_max_rows}")

    def _check_operations(self) -> None:
        """Refuse operations settings that would break the promises made in docs/operations.md."""
        if self.threads < 2:
            raise ConfigError(f"GUNICORN_THREADS must be at least 2 (one stays free for /health), got {self.threads}")
        if not 0 <= self.max_inflight < self.threads:
            raise ConfigError(
                f"MAX_INFLIGHT_REQUESTS must be between 1 and GUNICORN_THREADS - 1 ({self.threads - 1}) so that"
                f" /health always finds a free thread (0 = GUNICORN_THREADS - 1), got {self.max_inflight}"
            )
        if self.request_read_timeout <= 0:
            raise ConfigError(f"REQUEST_READ_TIMEOUT must be more than 0 seconds, got {self.request_read_timeout}")
        if self.max_connections <= self.threads:
            raise ConfigError(
                f"MAX_CONNECTIONS must be more than GUNICORN_THREADS ({self.threads}), so that kept-alive connections"
                f" and connections still sending can wait without a thread, got {self.max_connections}"
            )
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.embeddings_pooling not in ("mean", "last"):
            raise ConfigError(f"EMBEDDINGS_POOLING must be mean or last, got {self.embeddings_pooling!r}")
        if self.trusted_proxy_hops < 0:
            raise ConfigError(f"TRUSTED_PROXY_HOPS must not be negative, got {self.trusted_proxy_hops}")


def _auto_workers(settings: Settings, *, on_gpu: bool) -> int:
    """gunicorn worker processes when WEB_CONCURRENCY is 0: one on a GPU or for a model of real size, else 2."""
    if on_gpu:  # one copy of the model on the GPU
        return 1
    count = checkpoint.parameters(settings.model_name, settings.model_revision or None)
    return 1 if count is not None and count >= ONE_WORKER_MIN_PARAMETERS else 2


def _auto_quantization(settings: Settings, *, on_gpu: bool) -> str:
    """QUANTIZATION with auto resolved (checkpoint.quantization_for)."""
    if settings.quantization != "auto":
        return settings.quantization
    return checkpoint.quantization_for(settings.model_name, on_gpu=on_gpu, dtype=settings.dtype)


def documented() -> list[tuple[str, Any, str]]:
    """List (variable, default, meaning) for every setting, for the README and --help."""
    return [(f.metadata["env"], f.default, f.metadata["doc"]) for f in fields(Settings)]

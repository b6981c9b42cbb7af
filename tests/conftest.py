"""Shared fixtures: the app with a fake engine, the tiny and the real model, and real gunicorn servers."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from llmapi import create_app
from llmapi.engine.chat import default_template
from llmapi.engine.types import ContextLengthExceeded, GenerationRequest, GenerationResult, Piece

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-1"
OTHER_KEY = "test-key-2"
FAKE_CONTEXT = 64
REAL_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CACHE = ROOT / "models" / "gguf-cache"  # the Makefile's GGUF_CACHE_DIR: the conversion `make test` made


class FakeHandle:
    """A finished generation whose pieces are known in advance."""

    def __init__(self, request: GenerationRequest, pieces: list[str]) -> None:
        self.request = request
        self._pieces = pieces
        self.cancelled = False

    def pieces(self) -> Iterator[Piece | GenerationResult]:
        """Yield the canned pieces, then the result."""
        yield from (Piece(text) for text in self._pieces)
        yield self.result()

    def result(self) -> GenerationResult:
        """Build the result of the canned pieces."""
        return GenerationResult(
            text="".join(self._pieces),
            finish_reason="length",
            prompt_tokens=len(self.request.prompt.split()),
            completion_tokens=len(self._pieces),
            model="fake-model",
            seed=self.request.seed,
        )

    def cancel(self) -> None:
        """Record the cancellation."""
        self.cancelled = True


@dataclass
class FakeEngine:
    """Stands in for the model: one word per token, context of FAKE_CONTEXT words."""

    model_name: str = "fake-model"
    requests: list[GenerationRequest] = field(default_factory=list)

    def submit(self, request: GenerationRequest) -> FakeHandle:
        """Record the request and answer ' tok' per new token."""
        prompt_tokens = len(request.prompt.split())
        if prompt_tokens + request.max_new_tokens > FAKE_CONTEXT:
            raise ContextLengthExceeded(
                prompt_tokens=prompt_tokens, max_new_tokens=request.max_new_tokens, context_length=FAKE_CONTEXT
            )
        self.requests.append(request)
        return FakeHandle(request, [" tok"] * request.max_new_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Render like a model without a chat template."""
        return default_template(messages)

    context_length = FAKE_CONTEXT
    vocab_size = 1000

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """One id per word: its length (and a 0 in front with special tokens)."""
        return ([0] if add_special_tokens else []) + [len(word) for word in text.split()]

    def token_strings(self, ids: list[int]) -> list[str]:
        """'w<id>' per id."""
        return [f"w{i}" for i in ids]

    def decode(self, ids: list[int]) -> str:
        """'x' repeated per id, words joined by spaces."""
        return " ".join("x" * i for i in ids)

    def outside(self, ids: Sequence[int]) -> int | None:
        """The first id at or above the vocabulary size, as the real engines answer it."""
        return next((token for token in ids if token >= self.vocab_size), None)

    placement: ClassVar[dict[str, str]] = {}  # a fake runs nowhere
    on_stats: ClassVar[Any] = None

    def stats(self) -> dict[str, Any]:
        """No live figures."""
        return {}


@pytest.fixture
def fake_engine() -> FakeEngine:
    """A fresh fake engine."""
    return FakeEngine()


@pytest.fixture
def make_app(fake_engine: FakeEngine) -> Callable[..., Any]:
    """Build an app with the key KEY and `config` overrides, on `engine`, an engine `factory`, or the fake engine."""

    def make(engine: Any = None, *, factory: Callable[..., Any] | None = None, **config: Any) -> Any:
        chosen = fake_engine if engine is None else engine
        return create_app({"api_key": KEY, **config}, engine_factory=factory or (lambda settings: chosen))

    return make


@pytest.fixture
def app(make_app: Callable[..., Any]):
    """The app with two keys, small limits and the fake engine."""
    return make_app(api_keys=OTHER_KEY, max_new_tokens_limit=48, max_prompt_chars=200)


@pytest.fixture
def client(app):
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def llmapi_log(app) -> Iterator[io.StringIO]:
    """Point llmapi's log handler at a fresh buffer; put its stream, format, level and propagation back after."""
    logger = logging.getLogger("llmapi")
    (handler,) = [h for h in logger.handlers if getattr(h, "llmapi", False)]
    saved = handler.stream, handler.formatter, logger.level, logger.propagate
    stream = io.StringIO()
    handler.setStream(stream)
    yield stream
    handler.setStream(saved[0])
    handler.setFormatter(saved[1])
    logger.setLevel(saved[2])
    logger.propagate = saved[3]


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers carrying a valid key."""
    return {"x-api-key": KEY}


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The offline tiny GPT-2 directory, built once if missing."""
    path = Path(os.environ.get("LLMAPI_TEST_MODEL", ROOT / "models" / "tiny-gpt2"))
    if not (path / "config.json").exists():
        from llmapi.build_model import build

        build(path, size="tiny")
    return str(path)


@pytest.fixture(scope="session")
def small_model() -> str:
    """The offline small GPT-2 directory (124M random parameters), built once if missing (about 10 s)."""
    path = ROOT / "models" / "small-gpt2"
    if not (path / "config.json").exists():
        from llmapi.build_model import build

        build(path, size="small")
    return str(path)


@pytest.fixture(scope="session")
def real_model() -> str:
    """SmolLM2-135M-Instruct's GGUF file, which `make real-model` (run by `make test`) downloads and converts."""
    path = Path(os.environ.get("LLMAPI_REAL_MODEL", REAL_MODEL))
    if not path.is_file():
        message = f"{path} is missing: `make real-model` gets it (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: str):
    """The tiny model's tokenizer, to count and read tokens apart from the server (shared: never changed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def engine(tiny_model: str):
    """A real engine on the tiny model, shared by the engine tests."""
    from llmapi.engine import create_engine

    return create_engine(tiny_model, torch_threads=1, max_batch_size=8, batch_wait_ms=5)


@pytest.fixture(scope="session")
def sharp(sharp_model: str):
    """An engine on the sharp model (sharp_model)."""
    from llmapi.engine import create_engine

    return create_engine(sharp_model, torch_threads=1, max_batch_size=8, batch_wait_ms=5, dtype="float32")


@pytest.fixture(scope="session")
def sharp_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small random GPT-2 whose greedy text depends on positions and masks, saved once; returns its directory.

    The tiny model's two-wide hidden state barely notices a wrong position or mask; this one (64 wide, weights
    drawn 15x wider than GPT-2's initialisation) changes its argmax when either is off, while its top logits stay
    far enough apart that batched rounding cannot swap them.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(tmp_path_factory.mktemp("sharp-gpt2"))
    for item in Path(tiny_model).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, path)
    tiny_config = GPT2Config.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tiny_config.vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=tiny_config.bos_token_id,
        eos_token_id=tiny_config.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running gunicorn on loopback and its log."""

    process: subprocess.Popen
    url: str
    log_path: Path
    key: str = KEY

    def log(self) -> str:
        """Everything gunicorn has written so far."""
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
        """POST JSON with the key."""
        headers = {"x-api-key": self.key, **kwargs.pop("headers", {})}
        return requests.post(self.url + path, json=body, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def worker_pids(self) -> list[int]:
        """The pids of gunicorn's current workers."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def wait_workers(self, count: int, timeout: float = 20) -> list[int]:
        """Wait until gunicorn has `count` workers and return their pids."""
        deadline = time.monotonic() + timeout
        while len(pids := self.worker_pids()) != count and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop gunicorn and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    """Poll /health until it answers 200, or fail if gunicorn exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine
            pass
        time.sleep(0.05)
    raise TimeoutError("gunicorn did not answer /health in time")


def server_env(**env: str) -> dict[str, str]:
    """The environment of a test server: this one, minus llmapi settings, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "MODEL_NAME")}
    return {**base, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}


def launch(log_dir: Path, *, wait: bool = True, app: str = "wsgi:app", **env: str) -> Server:
    """Start gunicorn with `gunicorn.conf.py` on a free loopback port, logging into `log_dir`."""
    port = free_port()
    defaults = {"API_KEY": KEY, "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4"}
    env = server_env(**{**defaults, **env, "BIND": f"127.0.0.1:{port}"})
    log_path = log_dir / f"gunicorn-{port}.log"
    with log_path.open("wb") as log_file:  # the child keeps its own descriptor
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app]
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    if wait:
        try:
            wait_for_health(server.url, process)
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real gunicorn processes (see launch); all are stopped at teardown."""
    servers: list[Server] = []

    def start(**options: Any) -> Server:
        servers.append(launch(tmp_path, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """One gunicorn on the tiny model for a whole module, configured by the module's SERVER_ENV."""
    env = {"MODEL_NAME": tiny_model, **getattr(request.module, "SERVER_ENV", {})}
    running = launch(tmp_path_factory.mktemp("server"), **env)
    running.wait_workers(int(env.get("WEB_CONCURRENCY", "2")))
    yield running
    running.stop()


def run_concurrently(func: Callable[[int], Any], count: int) -> list[Any]:
    """Call func(0..count-1) on `count` threads at once (released together) and return results in order."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def target(i: int) -> None:
        try:
            start.wait(60)
            results[i] = func(i)
        except BaseException as exc:  # re-raised below in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results

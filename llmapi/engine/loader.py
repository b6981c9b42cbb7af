"""Turn a hub id or a local directory into a ready model and tokenizer, quirks handled here once."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from llmapi.engine.precision import Placement

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer and the facts the decoder needs."""

    model: Any
    tokenizer: Any
    name: str
    eos_ids: frozenset[int]
    pad_id: int
    context_length: int
    load_seconds: float
    device: str = "cpu"
    dtype: str = "float32"
    placement_reason: str = ""


def set_threads(threads: int) -> None:
    """Give torch `threads` intra-op threads in this process, and one inter-op thread."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process, or parallel work already ran
        pass


def on_a_thread_of_its_own(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `function` on a thread that ends with it, and return its result (or raise its exception).

    Every thread that runs a parallel torch operation keeps an OpenMP team of its own for life, and once libgomp
    manages more threads than there are CPUs its idle workers stop spinning and sleep: each parallel region then
    pays a wake-up. Loading on the caller's thread left a second team beside the engine thread's, and the int4
    kernel's 210 regions a step went from 43 to 84 ms on 2 cores (MKL's fp32 matmuls, with their own pool, did not
    notice). A thread that ends takes its team with it.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the caller, who sees it as if it had called `function` itself
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="llmapi-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Collect every end-of-sequence id the generation config and the tokenizer name."""
    found = model.generation_config.eos_token_id
    ids = set(found if isinstance(found, list) else [found] if found is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _context_length(model: Any, tokenizer: Any) -> int:
    """Find how many positions the model can attend over."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(tokenizer.model_max_length)


def fuse_tanh_gelu(model: Any) -> int:
    """Swap transformers' NewGELUActivation (GPT-2's tanh GELU) for torch's fused one; return how many.

    Both compute 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))). NewGELUActivation writes it as eight elementwise
    operations, each a pass over the MLP's activations (a tenth of a small-model step in the profile, README
    Performance); torch's gelu(approximate="tanh") is one pass, computed in fp32 internally even for bf16.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def resolve_quantization(quantization: str, name: str, *, device: str, dtype: str) -> str:
    """QUANTIZATION with auto made concrete (checkpoint.quantization_for); the service does it at start, in config."""
    if quantization != "auto":
        return quantization
    from llmapi.checkpoint import quantization_for

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return quantization_for(name, on_gpu=on_gpu, dtype=dtype)


def gguf_folder(path: str, *, device: str, dtype: str, quantization: str, cache_dir: str) -> tuple[str, Placement]:
    """Convert the GGUF file `path` once (engine/from_gguf.py) for the placement it will run in; return its folder."""
    from llmapi import checkpoint
    from llmapi.engine import from_gguf as gguf
    from llmapi.engine.precision import place

    gguf.check_file(path)
    quantization = resolve_quantization(quantization, path, device=device, dtype=dtype)
    # The dtype names the cache folder, so it is chosen before the file is read (its header takes seconds):
    # DTYPE=auto needs only a parameter count, and the file's size bounds it from below.
    parameters = checkpoint.parameters(path) or 0
    placement = place(device, dtype, config=None, parameters=parameters, quantization=quantization)
    # A quantized mode reads fp32 weights: those a Q4_1 block dequantizes to give its own 4-bit values back.
    folder_dtype = "float32" if quantization != "none" else placement.dtype
    started = time.perf_counter()
    folder, converted = gguf.ensure_converted(path, dtype=folder_dtype, root=cache_dir)
    done = "converted" if converted else "found the conversion of"
    log.info("pid=%d %s %s: %s (%.1fs)", os.getpid(), done, path, folder, time.perf_counter() - started)
    return str(folder), placement


def load(
    name: str,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: str = "none",
    gguf_cache_dir: str = "",
) -> LoadedModel:
    """Load `name` (hub id, directory or GGUF file) on DEVICE `device` in DTYPE `dtype` (each may be "auto")."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from llmapi.cpus import native_bf16
    from llmapi.engine.from_gguf import is_gguf
    from llmapi.engine.precision import count_parameters, own_tensors, place
    from llmapi.engine.quantize import q8_head, quantize_weights, split_head

    # Progress bars and length warnings go to the server log for every load; our own log says enough.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    quantization = resolve_quantization(quantization, name, device=device, dtype=dtype)
    source, reason = name, ""
    if is_gguf(name):
        source, gguf_placement = gguf_folder(
            name, device=device, dtype=dtype, quantization=quantization, cache_dir=gguf_cache_dir
        )
        # The choice made from the file's size stands, and so does its reason.
        dtype = gguf_placement.dtype
        reason = f"{gguf_placement.reason}; the GGUF file converted once"
    options = {"revision": revision or None}
    if os.path.isdir(source):
        options["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    config = AutoConfig.from_pretrained(source, **options)
    parameters = count_parameters(config)
    # Chosen before loading, so that the weights are read straight into the dtype: never an fp32 copy first
    # (a quantized mode reads fp32, its weights' best source, and keeps only the packed ones).
    placement = place(device, dtype, config=config, parameters=parameters, quantization=quantization)
    load_dtype = torch.float32 if quantization != "none" else placement.torch_dtype
    log.info(
        "pid=%d placing %s (%s parameters) on %s in %s: %s",
        os.getpid(), name, f"{parameters:,}", placement.device, placement.dtype, placement.reason,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=load_dtype, **options)
    model.to(placement.device)
    model.eval()
    fuse_tanh_gelu(model)
    if quantization != "none":
        swapped = quantize_weights(model, quantization, dtype=placement.torch_dtype)
        if quantization == "int4":  # the head at 8 bits for a lane of one row, a Q8_0 GGUF's own (quantize.py)
            q8_head(model, dtype=placement.torch_dtype)
        model.to(placement.torch_dtype)  # the rest (embedding, norms, head) computes in bf16 beside them
        if not native_bf16():  # torch emulates bf16 here: many rows through the head go faster in fp32
            split_head(model)
        own_tensors(model)
        log.info("pid=%d %s: %d linear layers quantized", os.getpid(), quantization, swapped)
    eos_ids = _eos_ids(model, tokenizer)
    # GPT-2 and many others ship no pad token; padded positions are masked, so any id will do.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        eos_ids=eos_ids,
        pad_id=pad_id,
        context_length=_context_length(model, tokenizer),
        load_seconds=time.perf_counter() - started,
        device=placement.device,
        dtype=quantization if quantization != "none" else placement.dtype,
        placement_reason=reason or placement.reason,
    )

"""Where the model runs and in which number format: DEVICE and DTYPE resolved before the load, and why.

`auto` picks what is fastest and safe for the model on this hardware. On a CPU that computes bf16 in hardware
(AVX-512 BF16 or AMX) a model of real size runs bf16: a decode step reads every weight once, and bf16 halves
those bytes and doubles the matmul rate. A model far smaller than that is all per-step overhead (the tiny
benchmark model: 100K parameters, 50,257 logits), and bf16's casts make it slower: it stays fp32, as it does on
a CPU without native bf16, where torch would emulate it. On a GPU the checkpoint's own half-precision dtype is
used (an fp32 checkpoint gets bf16 where the GPU computes it). The logits are upcast to fp32 before sampling
whatever the model computes in (step.py `DecodeStep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmapi.cpus import native_bf16

# The smallest model that auto puts in bf16 on a CPU. Measured with `python -m bench.precision` (README,
# Performance; batch 1 / batch 8, bf16 against fp32): 0.60 / 0.63 on 100K parameters, 1.06 / 1.02 on 0.8M,
# 0.82 / 1.05 on 1.7M, 1.00 / 2.05 on 3.4M, 1.63 / 1.55 on 16M, 1.06 / 2.38 on 124M.
BF16_MIN_PARAMETERS = 3_000_000
HALF_DTYPES = ("bfloat16", "float16")
QUANTIZED = {  # QUANTIZATION's modes (engine/quantize.py): what each computes in
    "int4": "4-bit weights in groups of 32 (torch's int4pack kernel), activations in bfloat16",
    "int8": "int8 weights, one scale per output channel (torch's int8pack kernel), activations in bfloat16",
}


class PlacementError(RuntimeError):
    """The configured device cannot be used in this process (no GPU, or not that one)."""


@dataclass(frozen=True)
class Placement:
    """The device and dtype a model is loaded with, and the reason `auto` (or the operator) chose them."""

    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16" or "float16"
    reason: str

    @property
    def torch_dtype(self) -> Any:
        """The dtype as a torch.dtype."""
        import torch

        return getattr(torch, self.dtype)


def resolve_device(requested: str, *, cuda_devices: int) -> str:
    """Turn DEVICE (auto, cpu, cuda, cuda:N) into a torch device name, given how many GPUs torch sees."""
    if requested == "auto":
        return "cuda:0" if cuda_devices else "cpu"
    if requested == "cpu":
        return "cpu"
    index = int(requested.partition(":")[2] or 0)
    if not cuda_devices:
        raise PlacementError(
            f"DEVICE={requested} but torch sees no GPU (torch.cuda.is_available() is False): install a CUDA build"
            " of torch (README, GPU install) or set DEVICE=cpu"
        )
    if index >= cuda_devices:
        raise PlacementError(
            f"DEVICE={requested} but torch sees {cuda_devices} GPU(s): cuda:0 to cuda:{cuda_devices - 1}"
        )
    return f"cuda:{index}"


def choose_dtype(
    requested: str,
    *,
    device: str,
    parameters: int,
    checkpoint_dtype: str | None,
    cpu_flags: frozenset[str] | None = None,
    gpu_bf16: bool = False,
) -> tuple[str, str]:
    """Return (dtype, reason) for DTYPE `requested` on `device`; `cpu_flags` None means this machine's."""
    if requested != "auto":
        return requested, f"DTYPE={requested}"
    if device.startswith("cuda"):
        if checkpoint_dtype in HALF_DTYPES:
            return checkpoint_dtype, f"auto: the checkpoint's own torch_dtype on a GPU ({checkpoint_dtype})"
        if gpu_bf16:
            return "bfloat16", f"auto: a {checkpoint_dtype or 'float32'} checkpoint on a GPU that computes bf16"
        return "float32", "auto: a float32 checkpoint on a GPU without bf16"
    if not native_bf16(cpu_flags):
        return "float32", "auto: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"
    if parameters < BF16_MIN_PARAMETERS:
        return "float32", (
            f"auto: {parameters:,} parameters, under {BF16_MIN_PARAMETERS:,}: per-step overhead, not arithmetic,"
            " sets this model's speed, and bf16 would slow it"
        )
    return "bfloat16", f"auto: native bf16 on this CPU and {parameters:,} parameters"


def place(
    requested_device: str, requested_dtype: str, *, config: Any, parameters: int, quantization: str = "none"
) -> Placement:
    """Resolve DEVICE and DTYPE for a model with `config` and `parameters`, on this machine (imports torch)."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(requested_device, cuda_devices=cuda)
    on_gpu = device.startswith("cuda")
    if quantization != "none":
        if on_gpu:
            raise PlacementError(f"QUANTIZATION={quantization} runs torch's CPU kernels: set DEVICE=cpu")
        return Placement(device, "bfloat16", f"QUANTIZATION={quantization}: {QUANTIZED[quantization]}")
    dtype, reason = choose_dtype(
        requested_dtype,
        device=device,
        parameters=parameters,
        checkpoint_dtype=checkpoint_dtype(config),
        gpu_bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    return Placement(device=device, dtype=dtype, reason=reason)


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint says it was saved in (`dtype`, or `torch_dtype` in older configs), as a name."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if found is None:
        return None
    return str(found).removeprefix("torch.")


def count_parameters(config: Any) -> int:
    """Count a model's parameters from its config alone (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def own_tensors(model: Any) -> None:
    """Copy the float tensors left after quantizing (embeddings, norms) out of the checkpoint's mmap.

    transformers reads safetensors through mmap and the loaded tensors are views of it. Quantizing replaces most
    of them, but while one view (the embedding) lives the whole file stays mapped, and every page the load
    touched stays resident: measured on the small model, 471 MiB of a 1,103 MiB worker.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()

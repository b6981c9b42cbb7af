"""Weight-only quantization on the CPU with torch's own kernels: int4 in groups of 32, int8 per output channel.

A decode step of one row reads every weight once, so its floor is the weights' bytes over memory bandwidth: 4-bit
weights are a quarter of bf16's. torch ships the kernels (`aten._weight_int4pack_mm_for_cpu`, gpt-fast's "tinygemm"
layout, and `aten._weight_int8pack_mm`); the weights stay packed and the activations stay bf16, so nothing is
dequantized to a float copy. torchao 0.18 (the release for torch 2.13) keeps its CPU int4 layout in `prototype`
only, so these few lines call the same kernels directly (docs/performance.md, 4-bit weights).

int4 is asymmetric in groups of 32 along each row: w = (q - 8) * scale + zero, q in 0..15, the layout of a GGUF
Q4_1 block (w = d * q + m, so scale = d and zero = m + 8d). A weight dequantized from Q4_1 holds its block's min and
max, so quantizing it again by min and max finds the very same 4-bit values: a Q4_1 GGUF is served with its own
weights. The output head (tied to the token embedding in most small models) stays in the compute dtype: one
per-channel int8 head turned SmolLM2's "Paris" into "L'Étoile" (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import torch

INT4_GROUP = 32  # a GGUF Q4_0/Q4_1 block; the kernel takes 32 to 256
INT4_ROWS = 16  # the int4pack layout packs output rows 16 at a time
# The int8pack kernel reads 8 inputs at a time with AVX2 and 16 with AVX-512: other widths give wrong sums, or crash
# (a width of 8, 24 or 40 killed the process on an AVX-512 Xeon).
INT8_COLUMNS = 16
MODES = ("int4", "int8")
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
INT8_MM = torch.ops.aten._weight_int8pack_mm.default
HEAD_FP32_ROWS = 8  # SplitHead: where fp32 overtakes emulated bf16 through a real model's head


def int4_qparams(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [N, K] by min and max per group of `group` columns: (q int32 [N, K], scale, zero [N, K/g])."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, columns)
    return q, scale.squeeze(-1), (low + 8 * scale).squeeze(-1)


class Int4Linear(torch.nn.Module):
    """A linear layer whose weight is 4-bit in groups (torch's CPU int4pack layout), computed in bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = group
        q, scale, zero = int4_qparams(weight, group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [K / group, N, 2]: each group's scale and zero, the kernel's layout
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (+ bias), W read 4 bits at a time."""
        # A decode step makes about 200 of these calls: the buffers are read from their dict (not through
        # nn.Module.__getattr__) and the kernel's overload is bound once, which saves a few microseconds a call.
        buffers = self._buffers
        scales_zeros = buffers["scales_zeros"]
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != scales_zeros.dtype:
            flat = flat.to(scales_zeros.dtype)
        y = INT4_MM(flat, buffers["packed"], self.group, scales_zeros).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel sees it, [N, K] in fp32: the reference the tests compare against."""
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).t().float()


class Int8Linear(torch.nn.Module):
    """A linear layer whose weight is int8 with one scale per output channel, computed in bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.float().abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (+ bias), W read 8 bits at a time."""
        buffers = self._buffers  # as Int4Linear.forward
        scales = buffers["scales"]
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != scales.dtype:
            flat = flat.to(scales.dtype)
        y = INT8_MM(flat, buffers["weight"], scales).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel sees it, [N, K] in fp32."""
        return self.weight.float() * self.scales.float()[:, None]


class SplitHead(torch.nn.Module):
    """The output head for a CPU without native bf16: bf16 for a few rows, fp32 from `fp32_rows` rows up.

    Without AVX-512 BF16 or AMX, torch emulates a bf16 matmul row by row: through SmolLM2's head (49,152 x 576),
    2 threads, bf16 takes 3.7 ms for one row and 95 ms for 32, fp32 8.9 ms and 33 ms; they cross near 8 rows
    (docs/performance.md, 4-bit weights). The bf16 weight is the tied embedding's own; the fp32 copy is the price.
    A row's logits then move by bf16's rounding with the number of rows in its step: bf16 texts already do (a
    padded row's attention sums in another order), and fp32 serving (QUANTIZATION=none) keeps batched equal solo.
    """

    def __init__(self, head: torch.nn.Linear, *, fp32_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.fp32_rows = fp32_rows
        self.weight = head.weight  # bf16, shared with the input embedding when the model ties them
        self.register_buffer("weight_fp32", head.weight.detach().float().clone(), persistent=False)
        self.bias = head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: bf16 arithmetic for fewer than fp32_rows rows, else fp32 (returned in fp32)."""
        if x.numel() // self.in_features < self.fp32_rows:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight_fp32, bias)


def split_head(model: Any, *, fp32_rows: int = HEAD_FP32_ROWS) -> None:
    """Give a bf16 model on a CPU without native bf16 the SplitHead (in place)."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        model.set_output_embeddings(SplitHead(head, fp32_rows=fp32_rows))


def linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A linear layer's weight as [out, in] and its bias: nn.Linear, or transformers' Conv1D (GPT-2), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.weight.detach(), module.bias
    if isinstance(module, Conv1D):
        return module.weight.detach().t().contiguous(), module.bias
    return None


def quantize_weights(model: Any, mode: str, *, dtype: torch.dtype = torch.bfloat16, group: int = INT4_GROUP) -> int:
    """Replace every linear layer but the output head by its `mode` (int4 or int8) twin, in place; return how many.

    A layer the kernel cannot take stays as it is: for int4 an input width not a multiple of `group` or an output not
    of 16, for int8 an input width not a multiple of 8. Read from fp32 weights: a weight
    dequantized from a GGUF then comes back to its own 4-bit values.
    """
    head = model.get_output_embeddings()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            found = None if child is head else linear_weight(child)
            if found is None:
                continue
            weight, bias = found
            if mode == "int4":
                if weight.shape[1] % group or weight.shape[0] % INT4_ROWS:
                    continue
                setattr(parent, name, Int4Linear(weight, bias, group=group, dtype=dtype))
            else:
                if weight.shape[1] % INT8_COLUMNS:
                    continue
                setattr(parent, name, Int8Linear(weight, bias, dtype=dtype))
            swapped += 1
    return swapped

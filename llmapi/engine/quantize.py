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
per-channel int8 head turned SmolLM2's "Paris" into "L'Étoile" (docs/performance.md). Under int4 a lane of one row
reads it at 8 bits in groups of 32 instead (Q8Head: a Q8_0 GGUF's own head), through two calls of the 4-bit kernel.
"""

from __future__ import annotations

from typing import Any

import torch

INT4_GROUP = 32  # a GGUF Q4_0/Q4_1 block; the kernel takes 32 to 256
INT4_ROWS = 16  # the int4pack layout packs output rows 16 at a time
INT4_JOIN_ROWS = 64  # ... in blocks of 64 on an AVX-512 CPU: Int4Linear.joined slices the packed weight at these
# The int8pack kernel reads 8 inputs at a time with AVX2 and 16 with AVX-512: other widths give wrong sums, or crash
# (a width of 8, 24 or 40 killed the process on an AVX-512 Xeon).
INT8_COLUMNS = 16
MODES = ("int4", "int8")
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
INT8_MM = torch.ops.aten._weight_int8pack_mm.default
HEAD_FP32_ROWS = 8  # SplitHead: where fp32 overtakes emulated bf16 through a real model's head
Q8_HEAD_ROWS = 1  # Q8Head: lanes of at most this many rows take the 8-bit head (two int4 calls cost more beyond)
# ... and passes of at most this many positions: a verification's longest (1 + config.MAX_SPECULATIVE_TOKENS, a test
# checks it), not a scored prompt's chunk, where two int4 calls of hundreds of rows would cost ten times bf16's one.
Q8_HEAD_POSITIONS = 33


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

    @classmethod
    def joined(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One layer computing every part's outputs side by side (lean.py), the parts then reading views of its weight;
        None where the kernel's layout does not allow it.

        The int4pack layout packs output rows in blocks (64 on an AVX-512 CPU): where every part's count is a multiple
        of INT4_JOIN_ROWS, the joined weight is the parts' packed rows one after another and each part's is a
        contiguous slice of it, held once. A probe checks the joined outputs against the parts' before anything is
        shared, in case another CPU's kernel blocks otherwise.
        """
        if len({part.group for part in parts}) != 1 or any(part.out_features % INT4_JOIN_ROWS for part in parts):
            return None
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.group = parts[0].in_features, parts[0].group
        layer.out_features = sum(part.out_features for part in parts)
        layer.register_buffer("packed", torch.cat([part.packed for part in parts]))
        layer.register_buffer("scales_zeros", torch.cat([part.scales_zeros for part in parts], dim=1))
        layer.bias = None
        if any(part.bias is not None for part in parts):
            biases = [
                part.scales_zeros.new_zeros(part.out_features) if part.bias is None else part.bias for part in parts
            ]
            layer.bias = torch.nn.Parameter(torch.cat(biases), requires_grad=False)
        probe = torch.randn((3, layer.in_features), generator=torch.Generator().manual_seed(0)).to(
            layer.scales_zeros.dtype
        )
        with torch.inference_mode():
            if not torch.equal(layer(probe), torch.cat([part(probe) for part in parts], dim=-1)):
                return None
        start = 0
        for part in parts:
            part.packed = layer.packed[start : start + part.out_features]
            start += part.out_features
        return layer

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


class Q8Head(torch.nn.Module):
    """The output head at 8 bits in groups of 32 (a GGUF Q8_0 block: w = d * q, q in -127..127) for a lane of few
    rows, and the head it wraps for more.

    torch has no grouped 8-bit kernel, but q = 16 * hi + lo with hi in -8..7 and lo in 0..15, so x @ W.T is the sum of
    two calls of the grouped 4-bit kernel: hi with scale 16d, lo with scale d (zero 8d, as the int4 layout counts q
    from 8). Read from fp32 weights dequantized from a Q8_0 GGUF, d and q come back exactly: the file's own head.
    SmolLM2's head (49,152 x 576), one row inside a decode step: 2.1 ms against 3.6 for bf16's (the bf16 weight is
    twice the bytes); from two rows on the two calls cost more than bf16's one (docs/performance.md, a lean step).
    The choice goes by the first dimension, a lane's rows, so that a verification (speculation.py) of a lane's
    positions takes the same head as the lane's plain steps (the kernel computes each row on its own); a pass of more
    than `positions` positions (a prompt scored for its logprobs) takes the wrapped head.
    """

    def __init__(
        self, weight: torch.Tensor, fallback: torch.nn.Module, *, dtype: torch.dtype, rows: int, positions: int
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rows, self.positions = rows, positions
        self.fallback = fallback
        groups = weight.float().reshape(self.out_features, -1, INT4_GROUP)
        scale = groups.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = (groups / scale).round().clamp(-127, 127).to(torch.int32)
        high = torch.div(q + 128, 16, rounding_mode="floor")  # hi + 8, in 0..15
        low = q + 128 - 16 * high  # lo, in 0..15
        for name, part, part_scale, zero in (("high", high, 16 * scale, 0 * scale), ("low", low, scale, 8 * scale)):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(part.reshape(self.out_features, -1), 1)
            self.register_buffer(f"{name}_packed", packed)
            scales_zeros = torch.cat([part_scale, zero], -1).transpose(0, 1).contiguous().to(dtype)
            self.register_buffer(f"{name}_scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: the 8-bit head for at most `rows` rows (x's first dimension) of at most `positions` positions, else
        the wrapped head's."""
        flat = x.reshape(-1, self.in_features)
        if x.shape[0] > self.rows or flat.shape[0] > self.rows * self.positions:
            return self.fallback(x)
        buffers = self._buffers
        if flat.dtype != buffers["low_scales_zeros"].dtype:
            flat = flat.to(buffers["low_scales_zeros"].dtype)
        high = INT4_MM(flat, buffers["high_packed"], INT4_GROUP, buffers["high_scales_zeros"])
        low = INT4_MM(flat, buffers["low_packed"], INT4_GROUP, buffers["low_scales_zeros"])
        return (high + low).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight as the two kernel calls see it, [N, K] in fp32."""
        eye = torch.eye(self.in_features, dtype=self.low_scales_zeros.dtype)
        high = INT4_MM(eye, self.high_packed, INT4_GROUP, self.high_scales_zeros).float()
        return (high + INT4_MM(eye, self.low_packed, INT4_GROUP, self.low_scales_zeros).float()).t()


def q8_head(
    model: Any, *, dtype: torch.dtype = torch.bfloat16, rows: int = Q8_HEAD_ROWS, positions: int = Q8_HEAD_POSITIONS
) -> bool:
    """Give an int4 model the Q8Head (in place, from its fp32 head); False where the head's shape does not allow it."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if head.in_features % INT4_GROUP or head.out_features % INT4_ROWS:
        return False
    model.set_output_embeddings(Q8Head(head.weight.detach(), head, dtype=dtype, rows=rows, positions=positions))
    return True


def split_head(model: Any, *, fp32_rows: int = HEAD_FP32_ROWS) -> None:
    """Give a bf16 model on a CPU without native bf16 the SplitHead (in place; behind a Q8Head, as its head for more
    rows)."""
    head = model.get_output_embeddings()
    if isinstance(head, Q8Head) and isinstance(head.fallback, torch.nn.Linear):
        head.fallback = SplitHead(head.fallback, fp32_rows=fp32_rows)
    elif isinstance(head, torch.nn.Linear):
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

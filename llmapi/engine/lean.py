"""A decode pass of a Llama-shaped model without transformers' module machinery: its operators, in one function.

On the CPU a one-row step of SmolLM2-135M ran some 5,400 operators, and the module calls, hooks, decorators and
keyword plumbing around them cost about a fifth of the step (18.4 against 14.9 ms in a scratch prototype of this
pass; docs/performance.md, a lean step). This runs each layer
as straight-line torch calls on the model's own weights, grows the same DynamicCache, and computes what transformers'
forward computes with the engine's attention (attention.py), to the bit (tests/test_lean.py). Where a layer's q, k and
v (or gate and up) are int4, one kernel call computes them together: the kernel's output columns do not depend on
each other, so the bits are the same, and the parts' packed weights become views of the joined one (no copy).

Prefill, and every model outside FAMILIES, stays transformers' own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmapi.engine import kv
from llmapi.engine.quantize import INT4_MM, Int4Linear

# Causal LMs whose decoder layer is Llama's: pre-norm RMSNorm, rotary q and k, SDPA, o, RMSNorm, gated MLP.
FAMILIES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights and calls."""

    norm_in: torch.Tensor
    qkv: Linear  # hidden -> q, k and v side by side
    o: Linear
    norm_post: torch.Tensor
    gate_up: Linear  # hidden -> gate and up side by side
    down: Linear
    scaling: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, operator for operator (torch's fused rms_norm rounds otherwise in bf16)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """Rotary's sine with its first half negated: x.roll(half) * this is transformers' rotate_half(x) * sin, bit for
    bit (negating is exact, and it moves from x's half to sin's), in one operator instead of four."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def direct(layer: Any) -> Linear:
    """A linear layer's call on 2-D activations: the int4 kernel itself for an Int4Linear (one operator, not
    Int4Linear.forward's three), else the layer's forward."""
    if type(layer) is not Int4Linear:
        return layer.forward
    packed, group, scales_zeros, bias = layer.packed, layer.group, layer.scales_zeros, layer.bias
    if bias is None:
        return lambda x: INT4_MM(x, packed, group, scales_zeros)
    return lambda x: INT4_MM(x, packed, group, scales_zeros) + bias


def joined(parts: list[Any]) -> Linear:
    """One call computing every part's output side by side: one int4 kernel call where they join, else each."""
    together = Int4Linear.joined(parts) if all(type(part) is Int4Linear for part in parts) else None
    if together is not None:
        return direct(together)
    calls = [direct(part) for part in parts]
    return lambda x: torch.cat([call(x) for call in calls], dim=-1)


class LeanDecoder:
    """Decode passes (one or a few positions per row, on a grown cache) of a Llama-shaped model on the CPU."""

    def __init__(self, model: Any) -> None:
        config = model.config
        inner = model.model
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = first.num_key_value_groups
        self.eps = inner.norm.variance_epsilon
        self.embed = inner.embed_tokens.forward
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        self.head = model.get_output_embeddings().forward
        self.layers = [
            Layer(
                norm_in=layer.input_layernorm.weight,
                qkv=joined([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=direct(layer.self_attn.o_proj),
                norm_post=layer.post_attention_layernorm.weight,
                gate_up=joined([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=direct(layer.mlp.down_proj),
                scaling=layer.self_attn.scaling,
            )
            for layer in inner.layers
        ]

    @staticmethod
    def build(model: Any) -> LeanDecoder | None:
        """A LeanDecoder for a model of FAMILIES on the CPU with SDPA and no sliding window, else None."""
        config = model.config
        inner = getattr(model, "model", None)
        if type(model).__name__ not in FAMILIES or inner is None or model.device.type != "cpu":
            return None
        if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
            return None
        norms = [inner.norm] + [
            n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        if any(type(norm).__name__ not in NORMS for norm in norms):
            return None
        if config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        return LeanDecoder(model)

    def usable(self, cache: Any) -> bool:
        """Whether this cache is one the lean pass can grow: a list of plain growing layers, one per layer."""
        return kv.mergeable(cache) and len(cache.layers) == len(self.layers)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, mask: torch.Tensor | None):
        """Feed `ids` [rows, width] at `positions`, growing `cache`; return the logits, [rows, width, vocab].

        `mask` is the lane's 2-D mask (1 for a real column, the fed ones included) when a row has padding, else None.
        """
        rows, width = ids.shape
        # The residual stream is 2-D, [rows * width, hidden]: the kernels take it as it is, with no reshape per call.
        x = self.embed(ids.reshape(-1))
        cos, sin = self.rotary(x, positions)
        # Over the heads of [rows, width, heads, head_dim]; the sine signed for the roll (signed_sin).
        cos, sin = cos.unsqueeze(2), signed_sin(sin).unsqueeze(2)
        half = self.head_dim // 2
        masks = self.masks(mask, rows, width, cache.layers[0].keys.shape[2] + width)
        for layer, held in zip(self.layers, cache.layers):
            h = rms_norm(x, layer.norm_in, self.eps)
            qkv = layer.qkv(h).view(rows, width, -1, self.head_dim)
            rotary = qkv[:, :, : self.heads + self.kv_heads]
            rotary = (rotary * cos) + (rotary.roll(half, -1) * sin)
            held.keys = torch.cat([held.keys, rotary[:, :, self.heads :].transpose(1, 2)], dim=-2)
            held.values = torch.cat([held.values, qkv[:, :, self.heads + self.kv_heads :].transpose(1, 2)], dim=-2)
            query = rotary[:, :, : self.heads].transpose(1, 2)
            x = x + layer.o(self.attend(query, held.keys, held.values, masks, layer.scaling))
            h = rms_norm(x, layer.norm_post, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)  # build() takes only SiLU MLPs
        return self.head(rms_norm(x, self.norm, self.eps).view(rows, width, -1))

    def masks(self, mask: torch.Tensor | None, rows: int, width: int, columns: int) -> list[tuple[int, Any]]:
        """Each fed position's columns seen (every one up to its own) and SDPA mask, the same in every layer: its
        row's real columns where a row has padding; all true where key heads are shared (the packed path,
        attention.py); else none."""
        masks = []
        for i in range(width):
            end = columns - width + i + 1
            if mask is not None:
                masks.append((end, mask[:, None, None, :end].bool()))
            else:
                masks.append((end, torch.ones((rows, 1, 1, end), dtype=torch.bool) if self.groups > 1 else None))
        return masks

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masks: list[Any], scaling: float):
        """Attention of each fed position over every column up to its own, one position at a time (attention.py)."""
        rows, _, width, _ = query.shape
        if width == 1:  # a plain step: every column, no slicing
            return self.one_position(query, keys, values, masks[0][1], scaling).view(rows, -1)
        outputs = [
            self.one_position(query[:, :, i : i + 1], keys[:, :, :end], values[:, :, :end], own, scaling)
            for i, (end, own) in enumerate(masks)
        ]
        return torch.cat(outputs, dim=1).reshape(rows * width, -1)

    def one_position(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Any, scaling: float):
        """SDPA for one query position per row, [rows, 1, heads, head_dim]: shared key heads through the packed path."""
        rows = query.shape[0]
        if self.groups > 1:
            query = query.reshape(rows, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=0.0, scale=scaling)
        return out.reshape(rows, -1, 1, self.head_dim).transpose(1, 2).contiguous()

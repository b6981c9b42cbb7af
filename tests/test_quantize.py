"""Weight-only int4 and int8 (engine/quantize.py): each layer against its dequantized reference, a GGUF Q4_1 block's
own 4-bit values recovered, every linear layer but the head swapped, and the real model still answering."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.quantize import INT4_GROUP, Int4Linear, Int8Linear, int4_qparams, quantize_weights


def reference_int4(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The weight rounded to 16 levels between each group's min and max, in fp32 (written apart from quantize.py)."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    return (torch.round((groups - low) / step) * step + low).reshape(rows, columns)


@pytest.mark.parametrize(("rows", "columns", "group"), [(96, 128, 32), (64, 256, 64), (48, 512, 128)])
def test_int4_layer_equals_its_dequantized_reference(rows, columns, group):
    torch.manual_seed(0)
    weight = torch.randn(rows, columns)
    layer = Int4Linear(weight, None, group=group, dtype=torch.bfloat16)
    reference = reference_int4(weight, group)
    step = (weight.reshape(rows, -1, group).amax(-1) - weight.reshape(rows, -1, group).amin(-1)) / 15
    # 4-bit rounding moves a weight by half a step at most; the kernel's weight is that, up to bf16's scale and zero
    assert float((reference - weight).abs().max()) <= float(step.max()) / 2 + 1e-6
    assert torch.allclose(layer.dequantized(), reference, atol=float(step.max()) * 0.1 + 0.02)
    x = torch.randn(5, columns)
    y = layer(x.to(torch.bfloat16)).float()
    expected = x @ reference.t()
    assert y.shape == (5, rows)
    assert float((y - expected).abs().max()) < 0.02 * float(expected.abs().max())
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == rows * columns // 2  # 4 bits a weight


def test_int4_finds_a_q4_1_blocks_own_values():
    """A weight dequantized from GGUF Q4_1 (w = d * q + m per block of 32) quantizes back to the same q, d and m."""
    torch.manual_seed(1)
    rows, columns = 8, 128
    q = torch.randint(0, 16, (rows, columns // INT4_GROUP, INT4_GROUP))
    q[..., 0], q[..., 1] = 0, 15  # a Q4_1 block's min and max are among its own values
    d = torch.rand(rows, columns // INT4_GROUP, 1).half().float() * 0.05 + 1e-3
    m = torch.randn(rows, columns // INT4_GROUP, 1).half().float() * 0.1
    weight = (d * q + m).reshape(rows, columns)
    found, scale, zero = int4_qparams(weight, INT4_GROUP)
    assert torch.equal(found, q.reshape(rows, columns).to(torch.int32))
    assert torch.allclose(scale, d.squeeze(-1), rtol=1e-5) and torch.allclose(zero, (m + 8 * d).squeeze(-1), atol=1e-6)


def test_int8_layer_equals_its_dequantized_reference():
    torch.manual_seed(2)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    layer = Int8Linear(weight, bias, dtype=torch.bfloat16)
    scale = weight.abs().amax(-1, keepdim=True) / 127
    reference = torch.round(weight / scale) * scale
    assert layer.weight.dtype == torch.int8
    assert torch.allclose(layer.dequantized(), reference, rtol=1e-2, atol=1e-4)
    x = torch.randn(3, 64)
    y = layer(x.to(torch.bfloat16)).float()
    expected = x @ reference.t() + bias
    assert float((y - expected).abs().max()) < 0.02 * float(expected.abs().max())


def tiny_llama(path: Path, tokenizer_from: str) -> str:
    """A random 2-layer Llama 64 wide (a width int4's groups divide) with the tiny model's tokenizer, at `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_families import family_config

    for item in Path(tokenizer_from).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, path)
    torch.manual_seed(0)
    config = family_config("llama", len(AutoTokenizer.from_pretrained(tokenizer_from)))
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_path(tiny_model, tmp_path_factory) -> str:
    """The tiny random Llama's folder."""
    return tiny_llama(tmp_path_factory.mktemp("llama"), tiny_model)


def test_quantize_swaps_every_linear_layer_but_the_head(llama_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    assert quantize_weights(model, "int4") == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert not any(type(m) is torch.nn.Linear for m in model.model.modules())
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100))
    assert quantize_weights(gpt2, "int8") == 4  # transformers' Conv1D: c_attn, c_proj, c_fc, mlp.c_proj
    narrow = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=1, n_head=2, vocab_size=100))
    assert quantize_weights(narrow, "int4") == 1  # 48 wide: only the MLP's 192-wide c_proj divides into 32s
    odd = GPT2LMHeadModel(GPT2Config(n_embd=12, n_layer=1, n_head=2, vocab_size=100))
    assert quantize_weights(odd, "int8") == 1  # 12 inputs: wrong sums in the kernel; 48 (the MLP's c_proj): fine


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_model_equals_its_dequantized_twin_and_serves(llama_path, mode):
    """The whole quantized model against fp32 with the very weights its kernels read: only bf16 activations differ."""
    from transformers import AutoModelForCausalLM

    from llmapi.engine.loader import load

    quantized = load(llama_path, quantization=mode)
    assert quantized.dtype == mode and quantized.model.dtype == torch.bfloat16
    twin = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    layers = dict(quantized.model.named_modules())
    for name, module in twin.named_modules():
        if isinstance(layers.get(name), (Int4Linear, Int8Linear)):
            module.weight.data = layers[name].dequantized()
    ids = torch.tensor([quantized.tokenizer.encode("tokens prompts and completions " * 4)])
    with torch.inference_mode():
        a, b = twin(input_ids=ids).logits[0], quantized.model(input_ids=ids).logits[0].float()
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())  # bf16 activations through random layers
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    engine = create_engine(llama_path, torch_threads=1, quantization=mode)
    try:
        assert engine.placement == {"device": "cpu", "dtype": mode}
        done = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, min_new_tokens=6))
        assert done.completion_tokens == 6
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_real_model_quantized_still_answers(real_model, mode):
    """Where torch's dynamic int8 answered "La femme de France…", weight-only int4 and int8 say Paris. (Asked without
    "in one sentence", the first token is a near-tie, "The" 25.33 against "L" 25.24 in fp32, which int4 on an
    AVX-512 CPU rounded into "L'Étoile": a test of the quantization needs a question the model is sure of.)"""
    from tests.conftest import GGUF_CACHE

    engine = create_engine(real_model, quantization=mode, gguf_cache_dir=str(GGUF_CACHE), torch_threads=2)
    try:
        assert engine.placement["dtype"] == mode
        question = "What is the capital of France? Answer in one sentence."
        prompt = engine.render_chat([{"role": "user", "content": question}])
        done = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=12))
        assert "Paris" in done.text
    finally:
        engine.close()


def write_gguf_header(path: Path, file_type: int | None) -> str:
    """A GGUF file holding only a header: an architecture, a string array, then `general.file_type` (if given)."""
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    entries = [string("general.architecture") + struct.pack("<I", 8) + string("llama")]
    words = ["a", "bb", "ccc"]
    entries.append(
        string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(words)) + b"".join(map(string, words))
    )
    entries.append(string("llama.rope.freq_base") + struct.pack("<If", 6, 10000.0))
    if file_type is not None:
        entries.append(string("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + b"".join(entries))
    return str(path)


@pytest.mark.parametrize(("file_type", "expected"), [(3, 3), (2, 2), (7, 7), (None, None)])
def test_gguf_file_type_is_read_from_the_header(tmp_path, file_type, expected):
    from llmapi import checkpoint

    assert checkpoint.gguf_file_type(write_gguf_header(tmp_path / "m.gguf", file_type)) == expected
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03")  # cut short: unreadable, not an error
    assert checkpoint.gguf_file_type(str(tmp_path / "bad.gguf")) is None


@pytest.mark.parametrize(
    ("file_type", "env", "expected"),
    [
        (3, {}, "int4"),  # Q4_1: its own 4-bit values
        (15, {}, "int4"),  # Q4_K_M
        (7, {}, "none"),  # Q8_0: int8 per channel would lose what its blocks of 32 keep
        (1, {}, "none"),  # F16
        (3, {"DTYPE": "float32"}, "none"),  # the operator asked for fp32
        (3, {"DEVICE": "cuda"}, "none"),  # the int4pack kernel here is the CPU's
        (3, {"QUANTIZATION": "int8"}, "int8"),  # said outright: kept
    ],
)
def test_auto_quantization_serves_a_4_bit_gguf_in_int4(tmp_path, monkeypatch, file_type, env, expected):
    from llmapi.config import Settings

    monkeypatch.setattr("llmapi.config.nvidia_gpu_visible", lambda: False)
    model = write_gguf_header(tmp_path / "m.gguf", file_type)
    settings = Settings.from_env({"API_KEY": "k", "MODEL_NAME": model, "QUANTIZATION": "auto", **env})
    assert settings.quantization == expected


def test_auto_quantization_leaves_other_models_alone(tiny_model, real_model):
    from llmapi.config import Settings

    assert Settings.from_env({"API_KEY": "k", "MODEL_NAME": tiny_model, "QUANTIZATION": "auto"}).quantization == "none"
    real = Settings.from_env({"API_KEY": "k", "MODEL_NAME": real_model, "QUANTIZATION": "auto"})
    assert real.quantization == "int4"  # SmolLM2's file is Q4_1 (general.file_type 3)


def test_split_head_takes_bf16_for_few_rows_and_fp32_for_many():
    from llmapi.engine.quantize import SplitHead

    torch.manual_seed(3)
    head = torch.nn.Linear(64, 1000, bias=False).to(torch.bfloat16)
    split = SplitHead(head, fp32_rows=8)
    assert split.weight is head.weight and split.weight_fp32.dtype == torch.float32
    reference = head.weight.float()
    few, many = torch.randn(1, 3, 64).to(torch.bfloat16), torch.randn(2, 5, 64).to(torch.bfloat16)
    out_few, out_many = split(few), split(many)
    assert out_few.dtype == torch.bfloat16 and out_many.dtype == torch.float32  # 3 rows, then 10
    assert torch.allclose(out_few.float(), few.float() @ reference.t(), atol=0.05, rtol=0.02)
    assert torch.allclose(out_many, many.float() @ reference.t(), atol=1e-4, rtol=1e-4)


def q8_0_weight(rows: int, columns: int) -> torch.Tensor:
    """A weight as a Q8_0 GGUF stores it: per block of 32, an fp16 scale d (the block's largest |w| over 127) times
    q in -127..127 (written apart from quantize.py)."""
    torch.manual_seed(5)
    blocks = torch.randn(rows, columns // 32, 32)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(rows, columns)


def test_q8_head_computes_the_8_bit_blocks_for_one_row_and_wraps_the_head_for_more():
    from llmapi.engine.quantize import Q8Head, q8_head

    weight = q8_0_weight(1024, 128)
    linear = torch.nn.Linear(128, 1024, bias=False)
    linear.weight.data = weight.clone()
    head = Q8Head(weight, linear.to(torch.bfloat16), dtype=torch.bfloat16, rows=1, positions=4)
    # The two 4-bit calls hold the blocks' own q: only each block's scale (in bf16) and bf16 outputs round.
    assert torch.allclose(head.dequantized(), weight, rtol=0.02, atol=1e-3)
    one = torch.randn(1, 4, 128).to(torch.bfloat16)  # a verification of one row's 4 positions
    exact = one.float() @ weight.t()
    out = head(one).float()
    assert float((out - exact).abs().max()) < 0.01 * float(exact.abs().max())
    for i in range(4):  # each position as a plain step of it alone computes it: the same bits
        assert torch.equal(head(one[:, i : i + 1]), head(one)[:, i : i + 1])
    two = torch.randn(2, 1, 128).to(torch.bfloat16)
    assert torch.equal(head(two), linear(two))  # two rows: the wrapped head
    scored = torch.randn(1, 5, 128).to(torch.bfloat16)
    assert torch.equal(head(scored), linear(scored))  # a prompt of 5 positions scored: the wrapped head
    model = SimpleNamespace(head=torch.nn.Linear(64, 100, bias=True))
    model.get_output_embeddings = lambda: model.head
    assert not q8_head(model)  # a bias: kept as it is (and 100 outputs are not a multiple of 16)


def test_q8_head_covers_the_longest_verification():
    from llmapi.config import MAX_SPECULATIVE_TOKENS
    from llmapi.engine.quantize import Q8_HEAD_POSITIONS

    assert Q8_HEAD_POSITIONS >= 1 + MAX_SPECULATIVE_TOKENS  # a row's last token and its whole draft

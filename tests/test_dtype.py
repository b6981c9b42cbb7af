"""DTYPE, DEVICE and QUANTIZATION: the choice (simulated CPU flags, model sizes, devices), the upcast before
sampling, and batched-equals-solo and the seed promise within one dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmapi.config import ConfigError, Settings
from llmapi.cpus import cpu_flags, native_bf16, nvidia_gpu_visible
from llmapi.engine import GenerationRequest, create_engine, postprocess, precision
from llmapi.engine.precision import BF16_MIN_PARAMETERS, PlacementError, choose_dtype, resolve_device
from llmapi.engine.sampling import RowControls, choose, choose_on_device
from llmapi.metrics import Metrics
from tests.conftest import KEY, run_concurrently
from tests.laws import chi_square_ok, softmax_law

ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx512f", "amx_bf16", "amx_tile"})
SKYLAKE = frozenset({"avx2", "avx512f", "avx512_vnni"})
SMALL = 124_439_808  # the offline small model (GPT-2 124M)
TINY = 102_714


@pytest.mark.parametrize(
    ("flags", "parameters", "expected"),
    [
        (ZEN4, SMALL, "bfloat16"),
        (SAPPHIRE_RAPIDS, SMALL, "bfloat16"),
        (SKYLAKE, SMALL, "float32"),  # AVX-512 without BF16: torch would emulate bf16, slower than fp32
        (frozenset(), SMALL, "float32"),  # flags unreadable (not Linux, or an ARM board)
        (ZEN4, TINY, "float32"),  # per-step overhead, not arithmetic: bf16 slows it
        (ZEN4, BF16_MIN_PARAMETERS - 1, "float32"),
        (ZEN4, BF16_MIN_PARAMETERS, "bfloat16"),
    ],
)
def test_auto_dtype_on_cpu_follows_the_flags_and_the_model_size(flags, parameters, expected):
    dtype, reason = choose_dtype(
        "auto", device="cpu", parameters=parameters, checkpoint_dtype="float32", cpu_flags=flags
    )
    assert dtype == expected
    assert reason.startswith("auto: ")


@pytest.mark.parametrize(
    ("checkpoint", "gpu_bf16", "expected"),
    [
        ("bfloat16", True, "bfloat16"),
        ("float16", True, "float16"),  # the checkpoint's own half type, as it was trained
        ("float32", True, "bfloat16"),
        (None, True, "bfloat16"),
        ("float32", False, "float32"),
    ],
)
def test_auto_dtype_on_cuda_takes_the_checkpoint_dtype(checkpoint, gpu_bf16, expected):
    dtype, _ = choose_dtype(
        "auto", device="cuda:0", parameters=TINY, checkpoint_dtype=checkpoint, cpu_flags=frozenset(), gpu_bf16=gpu_bf16
    )
    assert dtype == expected


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_whatever_the_hardware(requested):
    for flags in (ZEN4, SKYLAKE):
        assert choose_dtype(requested, device="cpu", parameters=TINY, checkpoint_dtype=None, cpu_flags=flags) == (
            requested,
            f"DTYPE={requested}",
        )


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert native_bf16(cpu_flags(cpuinfo)) and not native_bf16(frozenset({"avx512f"}))
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_nvidia_gpu_is_seen_without_torch(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not nvidia_gpu_visible(tmp_path / "absent") and not nvidia_gpu_visible(tmp_path)
    (tmp_path / "0000:01:00.0").mkdir()
    assert nvidia_gpu_visible(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not nvidia_gpu_visible(tmp_path)  # every GPU hidden from this process


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1")],
)
def test_device_resolution(requested, gpus, expected):
    assert resolve_device(requested, cuda_devices=gpus) == expected


@pytest.mark.parametrize(("requested", "gpus", "message"), [("cuda", 0, "no GPU"), ("cuda:2", 2, "2 GPU")])
def test_device_that_is_not_there_is_refused(requested, gpus, message):
    with pytest.raises(PlacementError, match=message):
        resolve_device(requested, cuda_devices=gpus)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DTYPE": "bf16"}, "DTYPE"),
        ({"DTYPE": "int8"}, "DTYPE"),
        ({"DEVICE": "gpu"}, "DEVICE"),
        ({"DEVICE": "cuda:x"}, "DEVICE"),
        ({"QUANTIZATION": "int3"}, "QUANTIZATION"),
        ({"QUANTIZATION": "int8", "DTYPE": "float32"}, "QUANTIZATION"),  # weight-only: activations in bf16
        ({"QUANTIZATION": "int4", "DTYPE": "float16"}, "QUANTIZATION"),
        ({"QUANTIZATION": "int4", "DEVICE": "cuda"}, "QUANTIZATION"),  # torch's CPU kernels
    ],
)
def test_config_refuses_unknown_dtype_device_and_quantization(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"API_KEY": "k", **env})


def test_config_workers_default_to_one_on_a_gpu(monkeypatch):
    monkeypatch.setattr("llmapi.config.nvidia_gpu_visible", lambda: False)
    assert Settings.from_env({"API_KEY": "k"}).web_concurrency == 2
    assert Settings.from_env({"API_KEY": "k", "DEVICE": "cuda"}).web_concurrency == 1
    assert Settings.from_env({"API_KEY": "k", "DEVICE": "cuda:1", "WEB_CONCURRENCY": "3"}).web_concurrency == 3
    monkeypatch.setattr("llmapi.config.nvidia_gpu_visible", lambda: True)
    assert Settings.from_env({"API_KEY": "k"}).web_concurrency == 1
    assert Settings.from_env({"API_KEY": "k", "DEVICE": "cpu"}).web_concurrency == 2


@pytest.mark.parametrize(("flags", "expected"), [(ZEN4, "bfloat16"), (SKYLAKE, "float32")])
def test_load_auto_falls_back_to_fp32_where_bf16_is_not_native(tiny_model, monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "BF16_MIN_PARAMETERS", 0)  # the tiny model counts as big enough here
    monkeypatch.setattr("llmapi.cpus.cpu_flags", lambda *args: flags)
    from llmapi.engine.loader import load

    loaded = load(tiny_model, device="auto", dtype="auto")
    assert (loaded.device, loaded.dtype) == ("cpu", expected)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, expected)}
    assert loaded.placement_reason.startswith("auto: ")


def test_load_auto_keeps_the_tiny_model_in_fp32_on_this_machine(engine):
    assert engine.placement == {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def bf16_engine(tiny_model):
    """The tiny model forced to bf16 (DTYPE=bfloat16)."""
    return create_engine(tiny_model, torch_threads=1, max_batch_size=8, batch_wait_ms=5, dtype="bfloat16")


def test_bf16_engine_upcasts_logits_before_sampling(bf16_engine, monkeypatch):
    seen: list[torch.dtype] = []
    real = postprocess.choose

    def spy(logits, rows, eos_ids):
        seen.append(logits.dtype)
        return real(logits, rows, eos_ids)

    monkeypatch.setattr(postprocess, "choose", spy)
    assert bf16_engine.placement == {"device": "cpu", "dtype": "bfloat16"}
    assert next(bf16_engine.loaded.model.parameters()).dtype == torch.bfloat16
    for request in (
        GenerationRequest(prompt="Hello", max_new_tokens=4),
        GenerationRequest(prompt="Hello", max_new_tokens=4, do_sample=True, temperature=0.8, seed=3),
    ):
        bf16_engine.generate(request)
    assert len(seen) == 8 and set(seen) == {torch.float32}  # the prefill's choice and every step's


def test_bf16_batched_greedy_equals_solo(bf16_engine):
    prompts = ["Hello", "The quick brown fox", "Artificial Intelligence is", "x"]
    specs = [GenerationRequest(prompt=p, max_new_tokens=10 + i, min_new_tokens=10 + i) for i, p in enumerate(prompts)]
    alone = [bf16_engine.generate(s) for s in specs]
    together = run_concurrently(lambda i: bf16_engine.generate(specs[i]), len(specs))
    assert [r.text for r in together] == [r.text for r in alone]
    assert max(r.timings["batch_size"] for r in together) > 1


def test_bf16_seed_repeats_under_concurrent_load(bf16_engine):
    seeded = GenerationRequest(prompt="Once", max_new_tokens=16, do_sample=True, temperature=0.9, seed=11)
    expected = bf16_engine.generate(seeded).text
    others = [GenerationRequest(prompt=f"Other {i}", max_new_tokens=8, do_sample=True) for i in range(4)]
    mixed = [seeded, *others, seeded]
    results = run_concurrently(lambda i: bf16_engine.generate(mixed[i]), len(mixed))
    assert results[0].text == results[-1].text == expected


def test_int8_quantizes_every_linear_layer_but_the_head_and_stays_close_to_fp32(small_model):
    from llmapi.engine.loader import load
    from llmapi.engine.quantize import Int8Linear

    fp32 = load(small_model, dtype="float32")
    int8 = load(small_model, quantization="int8")
    # GPT-2's Conv1D layers are caught: four a block (attention in and out, MLP in and out)
    assert int8.dtype == "int8"
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 4 * fp32.model.config.n_layer
    assert not isinstance(int8.model.get_output_embeddings(), Int8Linear)  # the head is kept (quantize.py)
    ids = torch.tensor([fp32.tokenizer.encode("Artificial Intelligence is")])
    with torch.inference_mode():
        a, b = fp32.model(input_ids=ids).logits, int8.model(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()))


def test_int8_keeps_the_layers_its_kernel_cannot_take(tiny_model):
    from llmapi.engine.loader import load
    from llmapi.engine.quantize import Int8Linear

    # 2 wide, with an MLP of 8: no input width is a multiple of 16 (quantize.INT8_COLUMNS), so every layer stays
    int8 = load(tiny_model, quantization="int8")
    assert int8.dtype == "int8" and "Conv1D" in {type(m).__name__ for m in int8.model.modules()}
    assert not any(isinstance(m, Int8Linear) for m in int8.model.modules())
    engine = create_engine(tiny_model, torch_threads=1, quantization="int8")
    assert engine.placement == {"device": "cpu", "dtype": "int8"}
    assert engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, min_new_tokens=6)).completion_tokens == 6


MAPPED = """
import gc, sys
from llmapi.engine.loader import load
loaded = load(sys.argv[1], quantization=sys.argv[2])
gc.collect()
print(any(sys.argv[1] in line for line in open("/proc/self/maps")))
"""


@pytest.mark.parametrize(("quantization", "mapped"), [("none", True), ("int8", False), ("int4", False)])
def test_quantizing_lets_the_checkpoint_mmap_go(tiny_model, quantization, mapped):
    """fp32 tensors are views of the mapped file; after quantizing every tensor left is owned, so no page of the file
    stays resident for the worker's life (a process of its own: other tests' engines map the file too)."""
    import subprocess
    import sys

    path = str(Path(tiny_model).resolve())
    done = subprocess.run([sys.executable, "-c", MAPPED, path, quantization], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(mapped)


def test_gpt2_tanh_gelu_is_torch_fused_one_and_computes_the_same(tiny_model):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from llmapi.engine.loader import fuse_tanh_gelu, load

    kinds = {type(m) for m in load(tiny_model).model.modules()}
    assert GELUTanh in kinds and NewGELUActivation not in kinds
    reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert fuse_tanh_gelu(fused) == reference.config.n_layer and fuse_tanh_gelu(fused) == 0
    x = torch.linspace(-8, 8, 4001)
    assert torch.allclose(GELUTanh()(x), NewGELUActivation()(x), atol=1e-6)
    ids = torch.tensor([[464, 3290, 318, 257, 922, 286]])
    with torch.inference_mode():
        a, b = reference(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_simple_engine_runs_in_bf16(tiny_model):
    simple = create_engine(tiny_model, torch_threads=1, engine_mode="simple", dtype="bfloat16")
    result = simple.generate(GenerationRequest(prompt="Hello", max_new_tokens=5, min_new_tokens=5, do_sample=True))
    assert simple.placement["dtype"] == "bfloat16" and result.completion_tokens == 5


def rows(count: int, *, greedy: bool = False, suppress: bool = False, seed: int = 0, **controls) -> list[RowControls]:
    """Row controls, sampled ones each with its own seeded generator."""
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, **controls}
    return [
        RowControls(
            greedy, suppress_eos=suppress, seen=set(), generator=torch.Generator().manual_seed(seed + i), **options
        )
        for i in range(count)
    ]


def test_device_sampler_greedy_and_suppressed_eos_match_the_cpu_sampler():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    controls = rows(2, greedy=True) + rows(2, greedy=True, suppress=True)
    eos = [int(logits[2].argmax()), int(logits[3].argmax())]
    cpu = choose(logits.clone(), controls, eos)
    device = choose_on_device(logits.clone(), controls, eos)
    assert device.tolist() == cpu.tolist()
    assert device[2] != eos[0] and device[3] != eos[1]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 7, 1.0), (1.0, 0, 0.6)]
)
def test_device_sampler_follows_the_softmax_law(temperature, top_k, top_p):
    vocab = 300
    scores = torch.linspace(-3, 2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))] - 40
    group = rows(50, temperature=temperature, top_k=top_k, top_p=top_p)
    counts = torch.zeros(vocab)
    for _ in range(200):
        counts += torch.bincount(choose_on_device(scores.expand(50, -1).clone(), group, []), minlength=vocab).float()
    probs = softmax_law(scores, temperature=temperature, top_k=top_k, top_p=top_p)
    assert counts[probs == 0].sum() == 0
    assert chi_square_ok(counts, probs)


def test_device_sampler_draws_repeat_with_the_seed():
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(5))
    draws = []
    for _ in range(2):
        group = rows(3, seed=9)
        draws.append([choose_on_device(logits.clone(), group, []).tolist() for _ in range(5)])
    assert draws[0] == draws[1]


def test_metrics_export_dtype_and_device_as_labels():
    metrics = Metrics(Settings.from_env({"API_KEY": "k"}))
    metrics.observe_load(1.0, placement={"device": "cpu", "dtype": "bfloat16"})
    assert b'llmapi_model_info{device="cpu",dtype="bfloat16"} 1.0' in metrics.render()


def test_ready_shows_dtype_and_device(client, fake_engine, monkeypatch):
    monkeypatch.setattr(type(fake_engine), "placement", {"device": "cpu", "dtype": "bfloat16"}, raising=False)
    client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": KEY})
    answer = client.get("/ready").get_json()
    assert answer["status"] == "ready" and (answer["dtype"], answer["device"]) == ("bfloat16", "cpu")

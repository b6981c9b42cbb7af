"""The GPU path (DEVICE=cuda): model, lanes and sampler on the device. Runs wherever torch sees a CUDA device."""

from __future__ import annotations

import pytest
import torch

from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.sampling import RowControls, choose
from tests.conftest import run_concurrently

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here (torch.cuda.is_available() is False): the GPU path is tested where one is",
)


@pytest.fixture(scope="module")
def cuda_engine(tiny_model):
    """The tiny model on the first GPU, in fp32 so that batched and solo arithmetic round alike."""
    return create_engine(tiny_model, torch_threads=1, max_batch_size=8, batch_wait_ms=5, device="cuda", dtype="float32")


def test_cuda_engine_puts_the_model_on_the_gpu(cuda_engine):
    assert cuda_engine.placement == {"device": "cuda:0", "dtype": "float32"}
    assert {p.device.type for p in cuda_engine.loaded.model.parameters()} == {"cuda"}


def test_cuda_auto_dtype_is_the_gpus_half_type(tiny_model):
    engine = create_engine(tiny_model, torch_threads=1, device="cuda")
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"  # the offline checkpoint is fp32
    assert engine.placement == {"device": "cuda:0", "dtype": expected}
    assert engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=5, min_new_tokens=5)).completion_tokens == 5


def test_cuda_sampler_keeps_the_tokens_on_the_device():
    logits = torch.randn(3, 1000, device="cuda")
    rows = [
        RowControls(True, 1.0, 0, 1.0, 1.0, False, set(), None),
        RowControls(True, 1.0, 0, 1.0, 1.0, True, set(), None),
        RowControls(False, 0.8, 40, 0.9, 1.2, False, {1, 2}, torch.Generator().manual_seed(1)),
    ]
    tokens = choose(logits.clone(), rows, [int(logits[1].argmax())])
    assert tokens.device.type == "cuda" and tokens.shape == (3,)
    assert int(tokens[0]) == int(logits[0].argmax()) and int(tokens[1]) != int(logits[1].argmax())


def test_cuda_batched_greedy_equals_solo(cuda_engine):
    specs = [GenerationRequest(prompt=p, max_new_tokens=12) for p in ("Hello", "The quick brown fox", "x", "Once")]
    alone = [cuda_engine.generate(s).text for s in specs]
    together = run_concurrently(lambda i: cuda_engine.generate(specs[i]), len(specs))
    assert [r.text for r in together] == alone


def test_cuda_seed_repeats_under_load(cuda_engine):
    seeded = GenerationRequest(prompt="Once", max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=5)
    expected = cuda_engine.generate(seeded).text
    mixed = [seeded, *[GenerationRequest(prompt=f"Other {i}", max_new_tokens=8) for i in range(4)], seeded]
    results = run_concurrently(lambda i: cuda_engine.generate(mixed[i]), len(mixed))
    assert results[0].text == results[-1].text == expected


def test_cuda_simple_engine_generates_on_the_gpu(tiny_model):
    simple = create_engine(tiny_model, torch_threads=1, engine_mode="simple", device="cuda")
    assert simple.generate(GenerationRequest(prompt="Hello", max_new_tokens=4, min_new_tokens=4)).completion_tokens == 4

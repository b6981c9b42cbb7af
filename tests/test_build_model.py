"""The offline model builder writes a real, deterministic Hugging Face GPT-2 directory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from llmapi.build_model import SHAPES, VOCAB_SIZE
from tests.conftest import ROOT, server_env


def digest(path: Path) -> str:
    """Hash a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_built_model_loads_offline_with_auto_classes(tiny_model):
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "print(type(m).__name__, m.config.n_embd, m.config.n_layer, m.config.n_head, m.config.vocab_size, len(t),"
        " t.eos_token, t.decode(t.encode('Artificial Intelligence is')))"
    )
    env = server_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, tiny_model], env=env, capture_output=True, text=True, check=True)
    shape = SHAPES["tiny"]
    expected = f"GPT2LMHeadModel {shape['n_embd']} {shape['n_layer']} {shape['n_head']} {VOCAB_SIZE} {VOCAB_SIZE}"
    assert out.stdout.startswith(expected)
    assert out.stdout.strip().endswith("<|endoftext|> Artificial Intelligence is")


def test_built_tokenizer_is_a_byte_level_bpe(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenizer.is_fast
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE"
    text = "any bytes at all: ü, 日本, 🎉, \t tabs"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("Artificial Intelligence is")) == 3  # words from its corpus are whole tokens


@pytest.mark.slow
def test_build_is_deterministic(tiny_model, tmp_path):
    out = tmp_path / "again"
    subprocess.run(
        [sys.executable, "-m", "llmapi.build_model", "--size", "tiny", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(out / name) == digest(Path(tiny_model) / name), name


def test_build_skips_an_existing_model(tiny_model, capsys):
    from llmapi.build_model import main

    assert main(["--out", tiny_model]) == 0
    assert "already built" in capsys.readouterr().err

"""Settings: read from the environment, checked, with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmapi import create_app
from llmapi.config import DEFAULT_MODEL, ConfigError, Settings, documented
from llmapi.engine.config import EngineConfig


def test_settings_defaults_from_a_minimal_environment():
    settings = Settings.from_env({"API_KEY": "k"})
    assert settings.model_name == DEFAULT_MODEL == "sshleifer/tiny-gpt2"
    assert settings.keys == ("k",)
    assert settings.max_new_tokens_limit == 512


def test_settings_collect_rotated_keys():
    assert Settings.from_env({"API_KEY": "a", "API_KEYS": " b, ,c "}).keys == ("a", "b", "c")


def test_settings_accept_api_keys_alone():
    assert Settings.from_env({"API_KEYS": "b"}).keys == ("b",)


def test_settings_without_a_key_refuse_to_start():
    with pytest.raises(ConfigError, match="set API_KEY"):
        Settings.from_env({})


def test_create_app_without_a_key_refuses(monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.delenv("API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="API_KEY"):
        create_app()


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MAX_NEW_TOKENS_LIMIT": "lots"}, "MAX_NEW_TOKENS_LIMIT"),
        ({"MAX_NEW_TOKENS_LIMIT": "0"}, "MAX_NEW_TOKENS_LIMIT"),
        ({"MAX_NEW_TOKENS_DEFAULT": "600"}, "MAX_NEW_TOKENS_DEFAULT"),
        ({"GENERATION_TIMEOUT_MS": "200000"}, "GENERATION_TIMEOUT_MS"),
        ({"WEB_CONCURRENCY": "-1"}, "WEB_CONCURRENCY"),
        ({"BATCH_WAIT_MS": "soon"}, "BATCH_WAIT_MS"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"MODEL_NAME": ""}, "MODEL_NAME"),
        ({"PREFIX_CACHE_MB": "-1"}, "PREFIX_CACHE_MB"),
        ({"PREFIX_CACHE_MB": "1.5"}, "PREFIX_CACHE_MB"),
        ({"PREFIX_CACHE_BLOCK_TOKENS": "0"}, "PREFIX_CACHE_BLOCK_TOKENS"),
        ({"PREFILL_CHUNK_TOKENS": "-8"}, "PREFILL_CHUNK_TOKENS"),
        ({"SPECULATION": "eagle"}, "SPECULATION"),
        ({"SPECULATIVE_TOKENS": "0"}, "SPECULATIVE_TOKENS"),
        ({"SPECULATIVE_TOKENS": "33"}, "SPECULATIVE_TOKENS"),
        ({"SPECULATION_NGRAM_MIN": "0"}, "SPECULATION_NGRAM_MIN"),
        ({"SPECULATION_NGRAM_MAX": "2", "SPECULATION_NGRAM_MIN": "3"}, "SPECULATION_NGRAM_MIN"),
        ({"SPECULATION_MAX_ROWS": "0"}, "SPECULATION_MAX_ROWS"),
        ({"MAX_PREFILL_TOKENS": "0"}, "MAX_PREFILL_TOKENS"),
        ({"MAX_PREFILL_TOKENS": "many"}, "MAX_PREFILL_TOKENS"),
    ],
)
def test_settings_bad_values_name_the_variable(env, names):
    with pytest.raises(ConfigError, match=names):
        Settings.from_env({"API_KEY": "k", **env})


def test_torch_threads_divide_the_cores(monkeypatch):
    monkeypatch.setattr("llmapi.config.available_cpus", lambda: 8)  # the CPUs this process may use (llmapi/cpus.py)
    assert Settings.from_env({"API_KEY": "k", "WEB_CONCURRENCY": "2"}).torch_threads == 4
    assert Settings.from_env({"API_KEY": "k", "WEB_CONCURRENCY": "16"}).torch_threads == 1
    assert Settings.from_env({"API_KEY": "k", "TORCH_THREADS": "3"}).torch_threads == 3


def test_every_setting_is_documented():
    for name, _default, doc in documented():
        assert name.isupper() and doc


def test_the_readme_configuration_table_lists_every_setting():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert [name for name, _, _ in documented() if f"| `{name}` |" not in readme] == []


def test_speculation_settings_reach_the_engine_config():
    settings = Settings.from_env({"API_KEY": "k", "SPECULATION": "auto", "SPECULATIVE_TOKENS": "8"})
    config = EngineConfig.from_settings(settings)
    assert (config.speculation, config.speculative_tokens, config.speculation_max_rows) == ("auto", 8, 1)
    assert Settings.from_env({"API_KEY": "k"}).speculation == "off"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"GUNICORN_THREADS": "1"}, "GUNICORN_THREADS"),
        ({"GUNICORN_THREADS": "4", "MAX_INFLIGHT_REQUESTS": "4"}, "MAX_INFLIGHT_REQUESTS"),
        ({"MAX_INFLIGHT_REQUESTS": "-1"}, "MAX_INFLIGHT_REQUESTS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"TRUSTED_PROXY_HOPS": "-1"}, "TRUSTED_PROXY_HOPS"),
        ({"WARMUP": "maybe"}, "WARMUP"),
    ],
)
def test_operations_settings_are_checked(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"API_KEY": "k", **env})


def test_admission_limit_defaults_to_one_below_the_threads():
    assert Settings.from_env({"API_KEY": "k", "GUNICORN_THREADS": "6"}).admission_limit == 5
    assert Settings.from_env({"API_KEY": "k", "MAX_INFLIGHT_REQUESTS": "3"}).admission_limit == 3


def test_openai_settings_come_from_the_environment():
    settings = Settings.from_env({"API_KEY": "k", "SERVED_MODEL_NAME": "gpt2", "OPENAI_MAX_CHOICES": "3"})
    assert (settings.served_model, settings.openai_max_choices) == ("gpt2", 3)


def test_openai_max_choices_must_be_positive():
    with pytest.raises(ConfigError, match="OPENAI_MAX_CHOICES"):
        Settings.from_env({"API_KEY": "k", "OPENAI_MAX_CHOICES": "0"})


def write_checkpoint(directory, shapes: dict[str, tuple[int, ...]], name: str = "model.safetensors") -> None:
    """A safetensors file of int8 zeros with these shapes (int8 keeps a 3M-parameter file at 3 MB)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(shape, dtype=torch.int8) for key, shape in shapes.items()}, str(directory / name))


def test_checkpoint_parameters_are_counted_from_the_safetensors_headers(tiny_model, tmp_path):
    from transformers import AutoConfig

    from llmapi import checkpoint
    from llmapi.engine.precision import count_parameters

    assert checkpoint.parameters(tiny_model) == count_parameters(AutoConfig.from_pretrained(tiny_model))
    write_checkpoint(tmp_path / "sharded", {"a": (1000, 1000)}, "model-1.safetensors")
    write_checkpoint(tmp_path / "sharded", {"b": (7, 3), "c": (5,)}, "model-2.safetensors")
    weight_map = {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "model-2.safetensors"}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert checkpoint.parameters(str(tmp_path / "sharded")) == 1_000_026
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\0" * 4000)
    assert checkpoint.parameters(str(tmp_path / "pickled")) == 1000  # fp32 assumed: 4 bytes a parameter
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\xff" * 16)
    assert checkpoint.parameters(str(tmp_path / "broken")) is None
    assert checkpoint.parameters(str(tmp_path / "empty")) is None


def test_checkpoint_of_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from llmapi import checkpoint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--cached"
    write_checkpoint(repo / "snapshots" / "abc123", {"w": (3000, 1000)})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert checkpoint.parameters("org/cached") == 3_000_000
    assert checkpoint.parameters("org/not-downloaded") is None


@pytest.mark.parametrize(
    ("shape", "env", "workers", "batch"),
    [
        ((3000, 1000), {}, 1, 32),  # 3M parameters: one worker with every core, a batch of 32
        ((2999, 1000), {}, 2, 8),  # under the threshold: Python overhead, two workers of 8
        ((3000, 1000), {"QUANTIZATION": "int4"}, 1, 32),  # weight-only kernels use every thread: one worker
        ((3000, 1000), {"WEB_CONCURRENCY": "3"}, 3, 8),
        ((3000, 1000), {"MAX_BATCH_SIZE": "12"}, 1, 12),
    ],
)
def test_workers_and_batch_follow_the_model_size(tmp_path, monkeypatch, shape, env, workers, batch):
    monkeypatch.setattr("llmapi.config.nvidia_gpu_visible", lambda: False)
    write_checkpoint(tmp_path / "model", {"w": shape})
    settings = Settings.from_env({"API_KEY": "k", "MODEL_NAME": str(tmp_path / "model"), **env})
    assert (settings.web_concurrency, settings.max_batch_size) == (workers, batch)


def test_the_tiny_model_keeps_two_workers(tiny_model, monkeypatch):
    monkeypatch.setattr("llmapi.config.nvidia_gpu_visible", lambda: False)
    monkeypatch.setattr("llmapi.config.available_cpus", lambda: 2)
    settings = Settings.from_env({"API_KEY": "k", "MODEL_NAME": tiny_model})
    assert (settings.web_concurrency, settings.max_batch_size, settings.torch_threads) == (2, 8, 1)

"""Settings: read from the environment, checked, with clear messages."""

from __future__ import annotations

import pytest

from llmapi import create_app
from llmapi.config import DEFAULT_MODEL, ConfigError, Settings, documented


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
    ],
)
def test_settings_bad_values_name_the_variable(env, names):
    with pytest.raises(ConfigError, match=names):
        Settings.from_env({"API_KEY": "k", **env})


def test_threads_per_worker_divides_the_cores(monkeypatch):
    monkeypatch.setattr("llmapi.config.available_cpus", lambda: 8)  # the CPUs this process may use (llmapi/cpus.py)
    assert Settings.from_env({"API_KEY": "k", "WEB_CONCURRENCY": "2"}).threads_per_worker == 4
    assert Settings.from_env({"API_KEY": "k", "WEB_CONCURRENCY": "16"}).threads_per_worker == 1
    assert Settings.from_env({"API_KEY": "k", "TORCH_THREADS": "3"}).threads_per_worker == 3


def test_every_setting_is_documented():
    for name, _default, doc in documented():
        assert name.isupper() and doc


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

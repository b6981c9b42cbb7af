"""lm-evaluation-harness against a real gunicorn: a multiple-choice, a perplexity and a generate task, from local files.

Its `local-completions` model scores choices and windows with `echo`, `logprobs: 1` and `max_tokens: 1`; its
`local-chat-completions` model runs generate tasks only. The perplexity it reports must be the one transformers'
own forward pass gives: that checks prompt scoring end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import KEY

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra: pip install -e '.[eval]'")
pytestmark = pytest.mark.slow

SERVED = "tiny-gpt2"
SERVER_ENV = {"SERVED_MODEL_NAME": SERVED, "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4"}
RUN_TIMEOUT_S = 300
TEXTS = ["Artificial Intelligence is a field of computer science.", "The quick brown fox jumps over the lazy dog."]
DATA = {
    "mc": [
        {"question": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
        {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
    ],
    "ppl": [{"text": text} for text in TEXTS],
    "gen": [{"question": "Q: Say yes.\nA:", "answer": " yes"}, {"question": "Q: Say no.\nA:", "answer": " no"}],
}
TASKS = {
    "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
    "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
    "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
    "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n"
    "  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three task YAMLs and their JSON-lines data in a folder for --include_path (datasets reads local files)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, rows in DATA.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        head = f"task: llmapi_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        (folder / f"llmapi_{name}.yaml").write_text(head + "test_split: test\n" + TASKS[name])
    return folder


def lm_eval(model: str, model_args: dict[str, object], tasks: Path, names: list[str], out: Path, *extra: str):
    """Run the harness's CLI and return its results JSON."""
    args = ",".join(f"{key}={value}" for key, value in model_args.items())
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args]
    cmd += ["--tasks", ",".join(names), "--include_path", str(tasks), "--output_path", str(out), *extra]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


def bits_per_byte(tiny_model: str) -> float:
    """What the perplexity task must report: each text scored after the end-of-text token, by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    total = 0.0
    for text in TEXTS:
        ids = [tokenizer.eos_token_id, *tokenizer(text).input_ids]
        with torch.inference_mode():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total += sum(float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids)))
    return -total / sum(len(text.encode()) for text in TEXTS) / math.log(2)


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_local_completions_runs_choice_perplexity_and_generate_tasks(
    server, tasks, tiny_model, tmp_path, tokenized
):
    model_args = {
        "model": SERVED,
        "base_url": f"{server.url}/v1/completions",
        "num_concurrent": 1,
        "max_retries": 1,
        "tokenized_requests": tokenized,  # the harness's default sends token ids; False sends text
        "tokenizer_backend": "huggingface",
        "tokenizer": tiny_model,  # the harness counts the context's tokens itself
    }
    names = ["llmapi_mc", "llmapi_ppl", "llmapi_gen"]
    results = lm_eval("local-completions", model_args, tasks, names, tmp_path / "out")
    assert 0.0 <= results["llmapi_mc"]["acc,none"] <= 1.0
    assert results["llmapi_ppl"]["bits_per_byte,none"] == pytest.approx(bits_per_byte(tiny_model), rel=1e-4)
    assert results["llmapi_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)


def test_lm_eval_local_chat_completions_runs_a_generate_task(server, tasks, tmp_path):
    model_args = {"model": SERVED, "base_url": f"{server.url}/v1/chat/completions", "num_concurrent": 1}
    results = lm_eval(
        "local-chat-completions", model_args, tasks, ["llmapi_gen"], tmp_path / "out", "--apply_chat_template"
    )
    assert results["llmapi_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)

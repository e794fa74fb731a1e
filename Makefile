# sigma-repro: `make demo` and `make test` work on a fresh machine (they create .venv).
# Exact versions come from constraints.txt (torch 2.14.1 / torchvision 0.29.1 / torchaudio 2.11.0).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast test-soak bench wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,slurm,tensorboard,speech]"
	touch $@

install: $(STAMP)

demo: install  ## plain vs sigmaReparam ViT on digits: table + entropy plot (~4 min on 2 cores)
	$(BIN)/sigma-repro demo

test: install  ## the test suite (what CI runs): everything but the many-launch fault soaks
	$(BIN)/python -m pytest -q -m "not soak" --durations=25

test-soak: install  ## the fault soaks CI leaves out to stay under 20 minutes (10 random SIGKILLs per setting, ...)
	$(BIN)/python -m pytest -q -m soak

test-fast: install  ## skip the slow / environment-bound tests
	$(BIN)/python -m pytest -q -m "not slow"

bench: install  ## sigmaReparam step-time overhead, ViT-S/16 at 224 on this machine
	$(BIN)/sigma-repro bench reparam --model vit_small --batch-sizes 1,4,16 --out results/bench/reparam_cpu.json

wheels:  ## the pure-Python wheels the GPU device image lacks, for tools/device_checks.sh (carried as .whl/)
	$(PYTHON) -m pip wheel --quiet --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache

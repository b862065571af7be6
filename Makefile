# Everything starts from a fresh clone: `make test` and `make repro` create .venv and install.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
# Telemetry off for every tool the project runs (see docs/ENVIRONMENT notes in README).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
# DVC stage commands call `python -m stages.<name>`: the venv's python and dvc come first.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast repro bench clean

install: .venv/.installed

.venv/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: a looser request would pull the multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements.lock -e ".[all]"
	touch $@

# Two workers on two cores, one torch thread each: more threads oversubscribe the CPU.
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

# The inner loop: everything but the tests marked slow (the tiny pipeline run, multi-process and
# subprocess benchmarks, interrupted-and-resumed training); about 2 minutes. Add a path or -k to narrow it.
test-fast: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" $(ARGS)

# The library's core tests (engine, adapters, protocol, memory) on Python 3.10 with torch and diffusers
# at the lowest versions pyproject.toml admits (requirements-lowest.txt), in .venv-lowest/.
.PHONY: test-lowest
test-lowest:
	.ci/lowest

# The main job: the DVC pipeline (pipeline stages in dvc.yaml, values in params.yaml) on the
# embedded default data; a second run with nothing changed does nothing. Every stage's params are
# checked first: `dvc repro` removes a stage's outputs before the stage could reject a param.
repro: install
	$(PY) -m stages.common.check --params params.yaml
	$(PY) -m dvc repro

# The paper's settings (profiles/paper.yaml, every experiment of supplements B and C) become params.yaml;
# `git checkout params.yaml` returns to the embedded default. The plan is printed: what runs, what must be in place.
# Table 2's ablation over seeds 0 1 2 (pipeline/ablation.py): every training run, infer and evaluate once per
# seed, then results/ablation/ablation.md with the mean and spread. Needs a finished `make repro` for the caches.
.PHONY: ablation
ablation: install
	$(PY) -m pipeline.ablation --seeds 0 1 2

.PHONY: profile-paper dry-run
profile-paper: install
	cp profiles/paper.yaml params.yaml
	$(PY) -m pipeline.dry_run --params params.yaml

# Every stage of params.yaml planned without running anything (PARAMS=profiles/paper.yaml for another profile).
dry-run: install
	$(PY) -m pipeline.dry_run --params $(or $(PARAMS),params.yaml)

# The core benchmark of docs/benchmark.md (about 7 minutes on 2 CPU cores).
bench: install
	$(PY) -m chopgrad.bench --decoder wan-tiny --frames 17,33,65 --d-trunc 0,1,2 --height 64 --width 64 --threads 1 \
		--json results/bench/wan-tiny.json --plot results/bench/wan-tiny.png

clean:
	rm -rf .venv .pytest_cache

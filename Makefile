# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned torch for this project's machines; Colab users skip this (see README).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean benchmark gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dq_kit.demo

test: $(STAMP)
	scripts/install_browser.sh || echo "Chromium unavailable: tests/test_browser.py will be skipped"
	$(PY) -m pytest -q -m "not slow"

benchmark: $(STAMP)
	$(PY) -m pytest -q -m slow
	$(PY) benchmarks/import_time.py
	$(PY) benchmarks/analysis_estimator.py
	$(PY) benchmarks/sequential_memory.py
	$(PY) benchmarks/memory_model.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/prepare_models.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quality_ceiling.py
	$(PY) benchmarks/family_presets.py

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist *.egg-info

# Every target creates the virtual environment it needs, so a fresh clone works with `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow test-bounds gpu-check lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP) $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cdfsl demo

# The batching tests (E episodes at once against each alone) run again under other CPU kernel sets: which kernels
# compute a row may decide whether the batched and single runs round alike, so a result that holds on one CPU only
# fails here on any CPU. avx512 is added where the CPU has it. The reruns take the files that check every method on
# every family (the learned context on PE-Core first showed the CPU dependence) and the tower-level checks: about 3 CPU
# minutes each; the multi-step ones (curves, VtT's switch-off, the TIR release, the runner: 11 minutes under load for
# all of -m batching) run once, in the first line. The set this CPU runs by itself (torch's own choice) is not rerun:
# the first line ran under it.
BATCHING_CAPABILITIES := default avx2 $(if $(shell grep -m1 -ow avx512f /proc/cpuinfo 2>/dev/null),avx512)
BATCHING_RERUN := tests/test_backbone_families.py tests/test_methods_registry.py tests/test_adapter.py \
	tests/test_lora.py tests/test_tir.py tests/test_maple.py
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -m "not slow"
	native=$$($(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	for capability in $(BATCHING_CAPABILITIES); do \
		[ "$$capability" = "$$native" ] && continue; \
		ATEN_CPU_CAPABILITY=$$capability $(BIN)/python -m pytest -m "batching and not slow" $(BATCHING_RERUN) || exit 1; \
	done

# Longer checks outside CI (tests marked slow).
test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -m slow

# The backbone tests against the oldest timm pyproject.toml allows (CI's install gets the newest); outside CI.
TIMM_LOWEST := 1.0.21
# Then the lowest torch (with the torchvision built for it), numpy, scipy and Pillow pyproject.toml allows, in a venv of
# their own, over a subset that exercises each: the towers and every method (torch), images and augmentation
# (Pillow, numpy), the statistics (scipy). torch 2.4.0 is the oldest whose wheels install here with a matching
# torchvision from the same index (the CPU-only 2.13 wheel does not match PyPI's torchvision).
LOWEST := torch==2.4.0 torchvision==0.19.0 numpy==1.24.0 scipy==1.10.0 pillow==10.0.0
LOWEST_VENV := .bounds/lowest
test-bounds: $(DEV_STAMP)
	$(BIN)/pip install --quiet --no-deps --target .bounds/timm-$(TIMM_LOWEST) timm==$(TIMM_LOWEST)
	PYTHONPATH=.bounds/timm-$(TIMM_LOWEST) $(BIN)/python -m pytest tests/test_backbone_families.py \
		tests/test_catalog.py tests/test_tokenizers.py tests/test_full_size.py -m "slow or not slow"
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install --quiet -e ".[dev]" $(LOWEST)
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_adapter.py tests/test_lora.py \
		tests/test_methods_registry.py tests/test_images.py tests/test_augment.py tests/test_compare.py \
		tests/test_engine.py -m "not slow"

# The check for a lent GPU (docs/gpu.md): device tests, an end-to-end run, the benchmark, equalities, host syncs;
# out.json and table.md under GPU_CHECK_OUT. Where there is no virtual environment (a bare GPU machine with torch),
# the system python runs it with cdfsl from src/ and the missing packages installed from the wheels in WHEELS
# (no network needed). DEVICE=cpu runs it all at tiny sizes in about a minute.
DEVICE ?= cuda
WHEELS ?= wheels
GPU_CHECK_OUT ?= gpu-check
GPU_SITE := .gpu-site
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check: $(if $(filter cpu,$(DEVICE)),$(DEV_STAMP))
	@if [ -d "$(WHEELS)" ] && ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) \
			$(WHEELS)/*.whl; fi
	PYTHONPATH=$(CURDIR)/src:$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
		$(GPU_PYTHON) benchmarks/gpu_check.py --device $(DEVICE) --out $(GPU_CHECK_OUT)

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(DEV_STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .bounds build dist src/*.egg-info .pytest_cache .ruff_cache $(GPU_SITE) $(GPU_CHECK_OUT)

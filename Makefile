# `make demo` sets everything up and trains the demo; `make test` sets up and runs the tests.
# `make test-fast` is the inner loop (no training, no cluster daemons, under 3 minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch here; on a CUDA machine set TORCH_SPEC to the build matching your driver.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed ships only as a source package whose build imports torch: build it against ours.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: setup
	WANDB_MODE=offline $(BIN)/orchestrator train experiment=demo

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
define pytest
$(BIN)/python -m pytest $(1) $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
endef

test: setup
	$(call pytest,--durations=25)

test-fast: setup
	$(call pytest,-m "not slow and not cluster and not gpu")

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/throughput.py

# One GPU (issue 15): a Llama-3-8B shape with random weights built on the device, packed 2048-token
# rows, LoRA r=16 on all linear layers, bf16 then NF4; HF Trainer + PEFT padding-free, the bare
# loop and ours. Writes bench/results/throughput-gpu-llama3-8b-{none,nf4}.json.
GPU_BENCH = --gpu --llama3 8b --seq 2048 --repeat 40 --global-batch 4 --steps 30 --warmup 5 --rounds 1 \
	--strategies "" --variants hf-padding-free,bare,ours
bench-gpu: setup
	$(BIN)/python bench/throughput.py $(GPU_BENCH) --quant none
	$(BIN)/python bench/throughput.py $(GPU_BENCH) --quant nf4

clean:
	rm -rf $(VENV) outputs multirun

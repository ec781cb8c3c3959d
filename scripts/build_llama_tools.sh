#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-perplexity, llama-quantize and llama-imatrix from the
# llama.cpp source that the INSTALLED llama-cpp-python's sdist vendors (same commit as the
# library tasa-edge links), CPU only, Release, static. Installed outside the clone, keyed by the
# llama-cpp-python version:
#
#   ${TASA_EDGE_CACHE:-~/.cache/tasa-edge}/llama.cpp-<version>/bin/llama-{bench,perplexity,quantize,imatrix}
#   ${TASA_EDGE_CACHE:-~/.cache/tasa-edge}/llama.cpp-<version>/BUILD_INFO.json
#
# Idempotent: when BUILD_INFO.json (for the same cmake arguments) and the four binaries exist, it
# prints the directory and exits.
#
# CPU flags: on x86-64 the build targets this machine's instruction set (AVX2 / AVX-512 / VNNI / BF16
# as /proc/cpuinfo lists them) WITHOUT AMX: ggml's AMX matmul crashes (SIGSEGV in
# ggml_backend_amx_mul_mat, seen with llama-cpp-python's own -march=native library) on VMs that
# list amx_* flags without granting the tile state. Elsewhere GGML_NATIVE=ON.
#
# Cross target: `build_llama_tools.sh aarch64` (`make tools-aarch64`) builds only llama-bench and
# llama-perplexity for aarch64 Linux with Debian's cross compiler (aarch64-linux-gnu-gcc/g++, packages
# gcc-aarch64-linux-gnu g++-aarch64-linux-gnu), fully static (-static: no .so, no loader needed on
# the device), OpenMP off (ggml's own thread pool, as llama.cpp's Android build), for
# armv8.2-a+dotprod+fp16 (Cortex-A76: Raspberry Pi 5; runs on newer phones too), into
#
#   ${TASA_EDGE_CACHE:-~/.cache/tasa-edge}/llama.cpp-<version>-aarch64/bin/llama-{bench,perplexity}
#
# The binaries run on an aarch64 board/phone, or here under qemu-user (`qemu-aarch64 BIN`).
#
# Env: PY (python, default python3), JOBS (parallel jobs, default 2), LLAMA_TOOLS_CMAKE_ARGS (extra
#      cmake arguments, e.g. "-DGGML_NATIVE=ON" to get AMX back), TASA_KEEP_LLAMA_BUILD=1 keeps the
#      unpacked source and the cmake build directory.
set -euo pipefail

PY="${PY:-python3}"
JOBS="${JOBS:-2}"
TARGET="${1:-host}"
case "$TARGET" in
    host) TOOLS=(llama-bench llama-perplexity llama-quantize llama-imatrix); SUFFIX="" ;;
    aarch64) TOOLS=(llama-bench llama-perplexity); SUFFIX="-aarch64" ;;
    *) echo "error: unknown target '$TARGET' (host or aarch64)" >&2; exit 2 ;;
esac

VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("llama_cpp_python"))')"
CACHE="${TASA_EDGE_CACHE:-$HOME/.cache/tasa-edge}"
PREFIX="$CACHE/llama.cpp-$VERSION$SUFFIX"
BIN="$PREFIX/bin"

cpu_args() {
    if [ "$(uname -m)" != x86_64 ] || [ ! -r /proc/cpuinfo ]; then
        echo "-DGGML_NATIVE=ON"; return
    fi
    local f a=(-DGGML_NATIVE=OFF)
    f=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    on() { case "$f" in *" $1 "*) echo "-D$2=ON";; *) echo "-D$2=OFF";; esac; }
    a+=("$(on avx GGML_AVX)" "$(on avx2 GGML_AVX2)" "$(on fma GGML_FMA)" "$(on f16c GGML_F16C)"
        "$(on bmi2 GGML_BMI2)" "$(on avx_vnni GGML_AVX_VNNI)" "$(on avx512f GGML_AVX512)"
        "$(on avx512vbmi GGML_AVX512_VBMI)" "$(on avx512_vnni GGML_AVX512_VNNI)"
        "$(on avx512_bf16 GGML_AVX512_BF16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    echo "${a[*]}"
}
cross_args() {
    local cc=aarch64-linux-gnu-gcc cxx=aarch64-linux-gnu-g++
    # GGML_OPENMP=OFF here overrides the =ON of the common cmake line (the later -D wins)
    echo "-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=$cc" \
         "-DCMAKE_CXX_COMPILER=$cxx -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu" \
         "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY" \
         "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY -DCMAKE_EXE_LINKER_FLAGS=-static" \
         "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF"
}
if [ "$TARGET" = aarch64 ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || {
        echo "error: aarch64-linux-gnu-gcc/g++ not found (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)" >&2
        exit 1; }
    CMAKE_ARGS="$(cross_args) ${LLAMA_TOOLS_CMAKE_ARGS:-}"
else
    CMAKE_ARGS="$(cpu_args) ${LLAMA_TOOLS_CMAKE_ARGS:-}"
fi
CMAKE_ARGS="${CMAKE_ARGS% }"

have_all() {
    [ -f "$PREFIX/BUILD_INFO.json" ] || return 1
    "$PY" - "$PREFIX/BUILD_INFO.json" "$CMAKE_ARGS" <<'EOF' || return 1
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("cmake_args") == sys.argv[2] else 1)
EOF
    for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if have_all; then
    echo "llama.cpp tools ($TARGET) for llama-cpp-python $VERSION: $BIN (cached)"
    exit 0
fi

START=$(date +%s)
SDIST_DIR="$CACHE/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$SDIST_DIR" "$PREFIX"
if [ ! -f "$SDIST" ]; then
    # exactly the installed version, source only, nothing else (~1.5 min: pip prepares its metadata)
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi
[ -f "$SDIST" ] || { echo "error: $SDIST not downloaded" >&2; exit 1; }

WORK="$PREFIX/work"
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xzf "$SDIST" -C "$WORK" "llama_cpp_python-$VERSION/vendor/llama.cpp" "llama_cpp_python-$VERSION/CHANGELOG.md"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# The sdist carries no .git, so llama.cpp's build-info would say "unknown": take the commit that
# llama-cpp-python's changelog names for this version ("update llama.cpp to ggml-org/llama.cpp@<sha>").
COMMIT="$(awk -v v="## [$VERSION]" '
    index($0, v) == 1 {on = 1; next}
    on && /^## \[/ {exit}
    on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}
' "$WORK/llama_cpp_python-$VERSION/CHANGELOG.md")"
COMMIT="${COMMIT:-unknown}"

BUILD="$WORK/build"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_COMMIT="$COMMIT" $CMAKE_ARGS \
    >"$PREFIX/cmake-configure.log" 2>&1 \
    || { tail -40 "$PREFIX/cmake-configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}" >"$PREFIX/cmake-build.log" 2>&1 \
    || { tail -60 "$PREFIX/cmake-build.log" >&2; exit 1; }

mkdir -p "$BIN"
for t in "${TOOLS[@]}"; do install -m 755 "$BUILD/bin/$t" "$BIN/$t"; done
END=$(date +%s)
MACHINE="$(uname -m)"
[ "$TARGET" = aarch64 ] && MACHINE=aarch64
"$PY" - "$PREFIX/BUILD_INFO.json" "$VERSION" "$COMMIT" "$((END - START))" "$CMAKE_ARGS" "$MACHINE" <<'EOF'
import json, sys, datetime
path, version, commit, secs, cmake_args, machine = sys.argv[1:]
json.dump({"llama_cpp_python": version, "llama_cpp_commit": commit, "cmake_args": cmake_args,
           "source": f"llama_cpp_python-{version}.tar.gz (PyPI sdist) vendor/llama.cpp",
           "cmake": "Release, CPU only, BUILD_SHARED_LIBS=OFF",
           "machine": machine, "build_seconds": int(secs),
           "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
          open(path, "w"), indent=1)
EOF
[ "${TASA_KEEP_LLAMA_BUILD:-0}" = 1 ] || rm -rf "$WORK"
echo "llama.cpp tools ($TARGET) for llama-cpp-python $VERSION (llama.cpp@$COMMIT): $BIN (built in $((END - START)) s)"

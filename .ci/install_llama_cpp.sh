#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's Python binding) with its OpenAI-compatible server: the GGUF export tests
# load models with it and make the k-quants (q4_k_m, q5_k_m, q6_k) with its quantizer; the self-instruct tests
# serve a teacher with its server. The registry has no binary wheel, so it is
# built from its source distribution: about 10 CPU-minutes, once; the wheel is kept under
# ~/.cache/alpaca_lora/wheels/portable and reused.
#
# The build is portable (-DGGML_NATIVE=OFF): a native build uses the build host's instructions (AMX,
# AVX-512) and dies with SIGILL when the machine behind it changes; a natively built wheel is never reused.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/alpaca_lora/wheels/portable"
if python -c "import llama_cpp, llama_cpp.server.app, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION is installed"; exit 0
fi
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  if ! command -v c++ >/dev/null 2>&1; then
    echo "WARNING: no C++ compiler (c++), so llama-cpp-python cannot be built and the llama.cpp export tests" \
         "will be skipped; install one (Debian: apt-get install g++ cmake) and run $0 again" >&2
    exit 0
  fi
  echo "building llama-cpp-python $VERSION (portable; about 10 CPU-minutes, once)"
  build=$(mktemp -d)
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$build"
  echo "built in $(( $(date +%s) - start )) s"
  mkdir -p "$CACHE"
  mv "$build"/llama_cpp_python-*.whl "$CACHE"/
  rm -rf "$build"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
# [server]: the OpenAI-compatible server the self-instruct tests use as a teacher
python -m pip install -q "${wheel}[server]"

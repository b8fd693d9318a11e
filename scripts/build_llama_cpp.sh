#!/usr/bin/env bash
# Build llama.cpp (llama-server, llama-bench) from source, the peer a CPU user would pick, for
# `python scripts/bench_llama_cpp.py`. Never run by CI or the tests.
#
#   bash scripts/build_llama_cpp.sh [DIR]      # DIR: default ~/.cache/via-sd/llama.cpp; ~15 min on 2 cores
#
# No binary download: the source is the tree vendored in the llama-cpp-python sdist (from PyPI, the
# only registry these machines reach). With Debian 12's GCC 12 the native build's AMX path dies with
# SIGILL: GCC drops the stores that fill the stack tile configuration in ggml_tile_config_init
# (only `ldtilecfg` reads it), so the script makes it a `static constexpr` built by a constexpr lambda
# (../shared/clients.md). Prints the path of llama-server at the end.
set -euo pipefail
VERSION=0.3.36
DIR=${1:-${VIA_SD_CACHE:-$HOME/.cache/via-sd}/llama.cpp}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR/src"
if [ ! -d "$DIR/src/llama_cpp_python-$VERSION" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$DIR/src" "llama-cpp-python==$VERSION"
    tar xzf "$DIR/src/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/src"
fi
TREE="$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

"$PYTHON" - "$TREE/ggml/src/ggml-cpu/amx/mmq.cpp" <<'PY'
import re, sys
path = sys.argv[1]
source = open(path).read()
if "via-sd: constexpr tile config" not in source:
    old = re.search(r"    alignas\(64\) tile_config_t tc = \{\};\n(.*?)    _tile_loadconfig\(&tc\);\n", source, re.S)
    assert old, "ggml_tile_config_init changed upstream: check the GCC 12 fix by hand"
    body = old.group(1)
    fixed = ("    // via-sd: constexpr tile config (GCC 12 drops stores to a stack struct only ldtilecfg reads)\n"
             "    static constexpr tile_config_t tc = [] {\n"
             "        tile_config_t tc = {};\n"
             + "".join("    " + line + "\n" for line in body.splitlines()) +
             "        return tc;\n    }();\n    _tile_loadconfig(&tc);\n")
    source = source[:old.start()] + fixed + source[old.end():]
    source = source.replace("struct tile_config_t{", "struct alignas(64) tile_config_t{", 1)
    open(path, "w").write(source)
PY

cmake -S "$TREE" -B "$TREE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF > "$DIR/configure.log"
cmake --build "$TREE/build" -j "$(nproc)" --target llama-server llama-bench
echo "$TREE/build/bin/llama-server"

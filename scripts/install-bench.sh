#!/usr/bin/env bash
# Install what `python -m bench` needs besides vfgen itself: wrk (apt), and
# matplotlib, aiohttp and vllm-factory 0.2.1 (pip). vllm-factory is installed
# with --no-deps: the benchmark only imports its forge.dispatcher module
# (aiohttp), not its vLLM/torch dependencies. Idempotent: a second run takes
# about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

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
echo "[install-bench] done"

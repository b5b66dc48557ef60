#!/usr/bin/env bash
# The GPU checks in one script, within about 12 minutes on one H100/H200-class GPU: `pytest -m gpu`
# (tests/test_gpu.py), then benchmarks/gpu.py's training and sampling parts; prints a Markdown
# table and exits non-zero when a check fails.
#
#   benchmarks/gpu.sh                    the GPU version (needs torch with CUDA and `pip install -e ".[test]"`)
#   benchmarks/gpu.sh --dry              every part at a tiny size on the CPU, in seconds
#   benchmarks/gpu.sh --peak-tflops 989  MFU against this peak when the GPU's name is not in the table
#
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
exec "$PYTHON" benchmarks/gpu.py --pytest "$@"

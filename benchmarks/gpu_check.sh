#!/usr/bin/env bash
# The GPU check: tests, a benchmark and a peer on one CUDA GPU, in at most 8 minutes, one JSON file.
#   benchmarks/gpu_check.sh [--wheels DIR] [--out PATH] [--skip PART ...]    (--help: every option and part)
# A thin wrapper: zili runs from this checkout (no install needed), under $PYTHON (default python3); the
# work is done by benchmarks/gpu_check.py.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$repo/benchmarks/gpu_check.py" "$@"

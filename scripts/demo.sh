#!/usr/bin/env bash
# The main job: sets up .venv and runs the MoE layer benchmark (the pretraining demo replaces this once the
# training system lands).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python scripts/bench_moe_layer.py "$@"

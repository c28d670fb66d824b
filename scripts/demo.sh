#!/usr/bin/env bash
# The main job: sets up .venv, pretrains st_moe_tiny on the embedded corpus (this Python's standard library)
# and evaluates it against a unigram byte baseline (scripts/demo.py; about 6-8 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python scripts/demo.py "$@"

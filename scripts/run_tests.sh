#!/usr/bin/env bash
# The test command: sets up .venv from requirements.txt and runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh -r requirements-test.txt
export TF_CPP_MIN_LOG_LEVEL=3
# loadgroup: the tests of one xdist_group (test_multiprocess, test_finetune_e2e, test_router_study: each shares
# a module fixture of real runs) go to one worker; the others are spread as by the default `load`.
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 tests "$@"

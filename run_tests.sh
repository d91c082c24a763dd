#!/usr/bin/env bash
# The test suite, offline, on CPU. Creates or reuses .venv (plus the test-only tools of requirements-test.txt).
# Extra arguments go to pytest (e.g. -k step1).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
TEST_STAMP=.venv/.requirements-test.sha256
want="$(sha256sum requirements-test.txt | cut -d' ' -f1)"
if [ "$(cat "$TEST_STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[tests] installing requirements-test.txt into .venv" >&2
  python -m pip install -q -r requirements-test.txt >&2
  echo "$want" > "$TEST_STAMP"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -q tests "$@"

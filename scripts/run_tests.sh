#!/usr/bin/env bash
# Run the test suite; pytest's exit code 5 ("no tests collected") is a failure here, never a pass.
set -u
PY=${1:-python3}
"$PY" -m pytest -q "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests. Check that tests/ exists and test files are named test_*.py." >&2
  exit 1
fi
exit "$rc"

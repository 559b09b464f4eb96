#!/usr/bin/env bash
# Install, then lint, type-check and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check bridge exporter tests bench
ruff format --check bridge exporter
echo "== mypy (strict on bridge/ and exporter/)"
mypy bridge exporter
echo "== pytest"
set +e
python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"

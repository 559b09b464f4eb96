#!/usr/bin/env bash
# Install, then lint, type-check and run the whole test suite on this host's Nix (Debian 12:
# 2.8.0), then the tests that use real Nix again under Debian 13's Nix 2.26 in a chroot
# (scripts/nix226.sh; NIX226=0 skips that part). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check bridge exporter tests bench
ruff format --check bridge exporter
echo "== mypy (strict on bridge/ and exporter/)"
mypy bridge exporter
echo "== pytest on $(nix-build --version | head -1)"
set +e
python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  status=1
fi
if [ "${NIX226:-1}" != 0 ]; then
  echo "== pytest -m nix on Debian 13's Nix 2.26 (scripts/nix226.sh)"
  set +e
  bash scripts/nix226.sh -n 2 --dist loadfile "$@"
  status226=$?
  set -e
  [ "$status" -ne 0 ] || status=$status226
fi
exit "$status"

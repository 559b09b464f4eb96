#!/usr/bin/env bash
# Install what the bridge needs on Debian 12 or 13 (as root), then the package into .venv.
#   bash scripts/setup.sh demo   what the demo needs: Nix, Python, a working nix.conf
#   bash scripts/setup.sh test   that, plus the test tools (Prometheus, PostgreSQL, Chromium,
#                                sqlite3, systemd-analyze, debootstrap, openssl)
# Idempotent: packages already present are not fetched again, an existing nix.conf is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-demo}

DEMO_PACKAGES=(nix-bin python3 python3-venv)
TEST_PACKAGES=(prometheus openssl sqlite3 systemd postgresql chromium debootstrap)
case "$profile" in
  demo) packages=("${DEMO_PACKAGES[@]}") ;;
  test) packages=("${DEMO_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
  *) echo "setup: unknown profile '$profile' (demo or test)" >&2; exit 2 ;;
esac

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: please install as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nix-bin without recommends ships no nix.conf, and Nix's built-in default then wants a
# 'nixbld' build group that does not exist: every build as root fails. Single-user Nix
# needs no build users, and this machine may have no kernel namespaces for a sandbox.
if [ ! -e /etc/nix/nix.conf ] && [ "$(id -u)" = 0 ]; then
  mkdir -p /etc/nix
  printf 'build-users-group =\nsandbox = false\n' > /etc/nix/nix.conf
  echo "setup: wrote /etc/nix/nix.conf (single-user Nix: no build users, no sandbox)"
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is older than 3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The demo gets a normal install; the tests an editable one, so subprocesses run the code
# of this checkout (bench/ measures start-up costs on a normal install of its own).
if [ "$profile" = test ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check .
fi

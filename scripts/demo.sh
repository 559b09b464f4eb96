#!/usr/bin/env bash
# The main job: install, then run the bridge on its embedded defaults (local state, a local
# file:// binary cache) against real Nix builds. Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/hydra-cachix-bridge demo "$@"

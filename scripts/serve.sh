#!/usr/bin/env bash
# Runs the gateway from this checkout (demo mode without --config). Use after
# scripts/install-deps.sh; arguments go to `p11gate serve` (e.g. --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"
exec uv run --frozen p11gate serve "$@"

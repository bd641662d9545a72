#!/usr/bin/env bash
# The test command: installs what is needed (unless P11GATE_SKIP_INSTALL=1), then lint,
# type check and the whole test suite against real SoftHSMv2, p11-kit and clients.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${P11GATE_SKIP_INSTALL:-0}" != "1" ]; then
  scripts/install-deps.sh
fi
command -v uv >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"

uv run --frozen ruff check src tests
uv run --frozen mypy
set +e
uv run --frozen pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

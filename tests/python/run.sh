#!/usr/bin/env bash
# Runs the Python tests: the real `openai` and `azure-storage-blob` clients against Azurite and
# the batch emulator. Sets up what it needs from the repository's own files (the pinned
# requirements, the npm lock file) and builds the emulator first. Each test session starts its
# own processes on free ports and stops them. Extra arguments go to pytest; `--prepare` alone
# only sets up the virtual environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

venv="$root/.venv"
stamp="$venv/.requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Reinstall only when the pinned requirements changed since the last install.
if ! cmp -s "$here/requirements.txt" "$stamp"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$stamp"
fi

[ "${1:-}" = --prepare ] && exit 0

if [ ! -x node_modules/.bin/azurite-blob ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

cargo build --quiet -p aoai-batch-emulator
export EMULATOR_BIN="${EMULATOR_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/aoai-batch-emulator}"

exec "$venv/bin/python" -m pytest "$here" -q "$@"

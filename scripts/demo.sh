#!/usr/bin/env bash
# The seed's demo on the embedded SQLite backend: start a worker, fire, print, stop.
set -euo pipefail
cd "$(dirname "$0")/../examples"
export SKUNQ_SQLITE_PATH="${SKUNQ_SQLITE_PATH:-$(mktemp -d)/demo.db}"
skunq work -q demo -r foo --log-level WARNING &
pool=$!
trap 'kill -TERM $pool 2>/dev/null; wait $pool 2>/dev/null || true' EXIT
python demo.py

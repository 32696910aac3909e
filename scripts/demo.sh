#!/usr/bin/env bash
# The seed's demo on the embedded SQLite backend: start a worker, fire, print, stop.
set -euo pipefail
cd "$(dirname "$0")/../examples"
scratch=""
if [ -z "${SKUNQ_SQLITE_PATH:-}" ]; then
    # Our own folder: the queue file, its WAL files and its wake folder all go with it at the end.
    scratch="$(mktemp -d)"
    export SKUNQ_SQLITE_PATH="$scratch/demo.db"
fi
skunq work -q demo -r foo --log-level WARNING &
pool=$!
cleanup() {
    kill -TERM "$pool" 2>/dev/null || true
    wait "$pool" 2>/dev/null || true
    if [ -n "$scratch" ]; then rm -rf "$scratch"; fi
}
trap cleanup EXIT
python demo.py

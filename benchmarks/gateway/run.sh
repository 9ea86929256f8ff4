#!/usr/bin/env bash
# The gateway benchmark end to end: wrk (Debian) and LiteLLM's proxy (its own venv) if missing, then the run.
# Extra arguments go to bench.py (e.g. --duration 20 --targets direct,sovereign).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >/dev/null || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null)
  else echo "wrk is missing: sudo apt-get install -y wrk" >&2; exit 1; fi
fi
bash benchmarks/gateway/setup_litellm.sh
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gateway/bench.py "$@"

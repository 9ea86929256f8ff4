#!/usr/bin/env bash
# The peer: LiteLLM's proxy in its own venv (.venv-bench-litellm at the repo root), because it pins its own deps.
# Pinned to a release before the withdrawn, compromised 1.107.0 (1.103+ need a certifi the index lacks); after
# installing we refuse a venv that carries an auto-executing .pth file such as the one those releases shipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3.11}
VERSION=${LITELLM_VERSION:-1.102.0}
VENV=.venv-bench-litellm
stamp=$VENV/.bench-litellm-$VERSION
if [ -f "$stamp" ]; then exit 0; fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
export PIP_DISABLE_PIP_VERSION_CHECK=1
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q "litellm[proxy]==$VERSION"
site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bad=$(grep -l -E "import|exec" "$site"/*.pth 2>/dev/null | grep -v -E "distutils-precedence|_virtualenv|__editable__" || true)
if [ -n "$bad" ]; then
  echo "refusing $VENV: unexpected executable .pth files: $bad" >&2
  exit 1
fi
touch "$stamp"

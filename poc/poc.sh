#!/usr/bin/env bash
# Thin wrapper around `adpfl poc` for machines where the venv is not activated:
#   poc/poc.sh prepare -n 3 && poc/poc.sh start && poc/poc.sh submit jobs/skin2d_adpfl ...
# Uses $ADPFL_PYTHON, else the repository's .venv, else python3 from PATH.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${ADPFL_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" -m adpfl.cli poc "$@"

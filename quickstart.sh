#!/usr/bin/env bash
# One command on a fresh machine: create .venv, install surd with its test tools, then run the whole
# mission on the embedded demo data, offline (build the dataset -> train -> generate -> eval, on tiny
# models surd writes itself). Extra arguments go to `surd quickstart` (see `surd quickstart --help`;
# --no-train builds the dataset only).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/surd quickstart "$@"

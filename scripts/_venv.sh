# Sourced by the other scripts: make sure .venv exists and holds lipia and its test tools, at the
# versions in requirements/constraints.txt (the ranges are in pyproject.toml; scripts/lock
# re-resolves them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
constraints=requirements/constraints.txt
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall whenever pyproject.toml or the constraints change (by content, not modification time).
stamp=.venv/.lipia-installed
wanted="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet -c "$constraints" pip
    .venv/bin/python -m pip install --quiet -c "$constraints" -e ".[test]"
    echo "$wanted" >"$stamp"
fi

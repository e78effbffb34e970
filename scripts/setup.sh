#!/usr/bin/env bash
# Set up .venv at the repository root: create it if absent, install torch 2.13.0 if torch is not
# importable in it (install another torch build into .venv first to keep that one), then install
# megatron-patch editable with its test extras. Safe to run again; works from any directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# Run a command with its output hidden, showing it only when the command fails.
quiet() {
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: failed: $*" >&2
        return 1
    fi
    rm -f "$log"
}

if [ ! -x "$PY" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. The one long step
# (minutes: a large download), so pip's own progress is shown.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (a large download; pip's progress follows)"
    if ! "$PY" -m pip install --progress-bar on "torch==2.13.0"; then
        echo "setup: failed: pip install torch==2.13.0" >&2
        exit 1
    fi
fi

echo "setup: pip install -e .[test]"
quiet "$PY" -m pip install -e ".[test]"
echo "setup: ready ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"

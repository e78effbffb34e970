# Sourced by the shell launchers (examples/common/launch.sh, toolkits/*): sets PYTHON to the
# interpreter that runs megatron-patch, the first of these that can import torch: $PYTHON when
# set (used as given, unchecked); the activated virtualenv or conda env; the repository's .venv
# (what scripts/setup.sh creates), so a fresh clone's launchers work without activating it;
# `python3` or `python` on PATH. With none, the launcher stops with one line saying what to do.
# Usage: find_python LAUNCHER_NAME REPOSITORY_ROOT

has_torch() {
    # find_spec, not an import: milliseconds instead of torch's seconds.
    "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
        >/dev/null 2>&1
}

find_python() {
    local name=$1 root=$2 candidate candidates=()
    if [ -n "${PYTHON:-}" ]; then
        return 0
    fi
    [ -n "${VIRTUAL_ENV:-}" ] && candidates+=("$VIRTUAL_ENV/bin/python")
    [ -n "${CONDA_PREFIX:-}" ] && candidates+=("$CONDA_PREFIX/bin/python")
    candidates+=("$root/.venv/bin/python" "$(command -v python3 || true)"
                 "$(command -v python || true)")
    for candidate in "${candidates[@]}"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && has_torch "$candidate"; then
            PYTHON=$candidate
            return 0
        fi
    done
    echo "$name: error: no Python with torch found (no $root/.venv, none on PATH): run" \
         "'bash scripts/setup.sh' and 'source .venv/bin/activate', or set PYTHON" >&2
    exit 127
}

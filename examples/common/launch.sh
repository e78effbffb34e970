#!/usr/bin/env bash
# Shared by every examples/<family>/run_*.sh: puts MEGATRON_PATH (optional Megatron-LM tree)
# and MEGATRON_PATCH_PATH first on PYTHONPATH, then hands all arguments to megatron_patch.launch.
# Usage: launch.sh COMMAND ENV MEGATRON_PATH MEGATRON_PATCH_PATH ...
set -euo pipefail
command=$1
megatron_path=${3:-}
patch_path=${4:-}
if [ -z "$patch_path" ]; then
  patch_path=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
fi
export PYTHONPATH="${megatron_path:+$megatron_path:}$patch_path${PYTHONPATH:+:$PYTHONPATH}"
shift
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/find_python.sh"
find_python "$(basename "$0")" "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec "$PYTHON" -m megatron_patch.launch "$command" "$@"

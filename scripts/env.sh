# Source this to build or run p2pml by hand with the project's libtorch:
#   source scripts/env.sh && cargo build --release
_p2pml_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_p2pml_root/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _p2pml_root

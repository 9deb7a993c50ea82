# Sourced by demo.sh and test.sh: makes sure redis-server and the project's
# virtual environment (.venv, package built with its Cython fast path) exist.
# Safe to run again: it only does what is missing or out of date.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GATEWAY_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

need_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return 0
    fi
    apt_install redis-server
    # The package starts a system Redis on 6379; the gateway's scripts start
    # their own on other ports and leave that one alone.
}

apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "==> installing $* (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need_venv() {
    local extras="${1:-}"
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: Python 3.11 or newer is needed (found: $("$PY" --version 2>&1))" >&2
        exit 1
    fi
    # The Cython fast path is compiled here: it needs a C compiler, the
    # Python headers and venv, which a fresh Debian/Ubuntu may lack.
    local missing=()
    command -v gcc >/dev/null 2>&1 || missing+=(build-essential)
    "$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(
        os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
        || missing+=(python3-dev)
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt_install "${missing[@]}"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment $VENV"
        "$PY" -m venv "$VENV" || {
            echo "error: '$PY -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
            exit 1
        }
    fi
    local stamp="$VENV/.gateway-installed$extras"
    # Reinstall when the package's sources or build files changed.
    if [ ! -f "$stamp" ] || [ -n "$(find "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/gateway" \
            -newer "$stamp" \( -name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.toml' \) \
            2>/dev/null | head -n 1)" ]; then
        echo "==> installing the gateway and its dependencies into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
        # Build requirements first, then an editable install without build
        # isolation: the compiled module lands next to the sources, so the
        # tests import exactly what they see.
        "$VENV/bin/python" -m pip install -q "Cython==3.3.1" "picows==2.3.1"
        "$VENV/bin/python" -m pip install -q --no-build-isolation -e "$ROOT$extras"
        (cd "$ROOT" && "$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null)
        touch "$stamp"
    fi
}

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

need_chromium() {
    # tests/test_web_ui.py drives Debian's Chromium by its path; Playwright
    # (a pip package) never downloads a browser of its own.
    if [ -x /usr/bin/chromium ]; then
        return 0
    fi
    # Debian's package is "chromium" (Ubuntu's is a snap): where it cannot be
    # installed, say so and go on; those tests then report themselves skipped.
    if ! command -v apt-get >/dev/null 2>&1 || ! apt_install chromium; then
        echo "warning: could not install Chromium (apt-get install chromium);" \
             "tests/test_web_ui.py will be skipped" >&2
    fi
}

need_podman() {
    # tests/test_container.py builds Dockerfile.ws with podman (runc as its
    # runtime) on a Debian base it makes with debootstrap; about two minutes
    # the first time a day. It needs root: skipped otherwise, as it is where
    # these cannot be installed.
    if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 \
            && command -v debootstrap >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1 \
            || ! apt_install podman runc debootstrap; then
        echo "warning: podman, runc and debootstrap are not installed;" \
             "tests/test_container.py will be skipped" >&2
    fi
}

apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "==> installing $* (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# One install step: a line saying what it does and how long it took; its
# output goes to $VENV/install.log and is shown only if it fails.
step() {
    local what="$1"
    shift
    local start=$SECONDS
    printf '    %s ... ' "$what"
    if "$@" >>"$VENV/install.log" 2>&1; then
        echo "done ($((SECONDS - start)) s)"
    else
        echo "FAILED"
        echo "error: $what failed; the end of $VENV/install.log:" >&2
        tail -n 30 "$VENV/install.log" >&2
        exit 1
    fi
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
        echo "==> installing the gateway and its dependencies into $VENV (about a minute the first time)"
        local log="$VENV/install.log"
        : >"$log"
        step "upgrading pip, setuptools and wheel" \
            "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel
        step "installing the build requirements (Cython, picows)" \
            "$VENV/bin/python" -m pip install "Cython==3.3.1" "picows==2.3.1"
        # Build requirements first, then an editable install without build
        # isolation: the compiled module lands next to the sources, so the
        # tests import exactly what they see.
        step "installing the package and its dependencies${extras:+ (with $extras)}" \
            "$VENV/bin/python" -m pip install --no-build-isolation -e "$ROOT$extras"
        step "compiling the fast path (Cython to C to a shared library)" \
            bash -c "cd '$ROOT' && '$VENV/bin/python' setup.py -q build_ext --inplace"
        touch "$stamp"
    fi
}

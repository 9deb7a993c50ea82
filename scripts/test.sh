#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (redis-server, Chromium, podman, .venv),
# checks the code (ruff, mypy, and stubtest for the compiled module's stub),
# then pytest over every tier (pyproject's addopts leave out the slow one;
# -m "" puts it back). Extra arguments go to pytest, after ours: a -m of
# yours wins. It fails if any step failed; every step runs regardless.
source "$(dirname "$0")/bootstrap.sh"
need_redis
need_chromium
need_podman
need_venv "[test]"
cd "$ROOT"
set +e
checks=0
echo "==> ruff"
"$VENV/bin/ruff" check . || checks=1
echo "==> mypy"
"$VENV/bin/mypy" || checks=1
echo "==> stubtest (gateway/_fastpath.pyi against the compiled module)"
"$VENV/bin/python" -m mypy.stubtest gateway._fastpath || checks=1
echo "==> pytest"
"$VENV/bin/python" -m pytest -m "" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a filter that matches nothing must not
    # look like a pass, in CI least of all.
    echo "test.sh: no test was selected (pytest exit 5); check the -k/-m or paths given" >&2
fi
if [ "$rc" -eq 0 ] && [ "$checks" -ne 0 ]; then
    echo "test.sh: the tests passed but a code check above failed" >&2
    rc=1
fi
exit "$rc"

#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (redis-server, .venv),
# then pytest over every tier (pyproject's addopts leave out the slow one;
# -m "" puts it back). Extra arguments go to pytest, after ours: a -m of
# yours wins.
source "$(dirname "$0")/bootstrap.sh"
need_redis
need_venv "[test]"
cd "$ROOT"
set +e
"$VENV/bin/python" -m pytest -m "" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a filter that matches nothing must not
    # look like a pass, in CI least of all.
    echo "test.sh: no test was selected (pytest exit 5); check the -k/-m or paths given" >&2
fi
exit "$rc"

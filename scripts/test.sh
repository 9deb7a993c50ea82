#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (redis-server, .venv),
# then pytest. Extra arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh"
need_redis
need_venv "[test]"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"

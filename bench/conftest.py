"""Micro-benchmark fixtures: every benchmark runs on the compiled fast path
and on its pure-Python twin in the same session (the baseline)."""
import pytest

from gateway import _fastpath_py

try:
    from gateway import _fastpath as _fastpath_c
except ImportError:
    _fastpath_c = None


@pytest.fixture(params=[pytest.param(_fastpath_c, id="compiled"), pytest.param(_fastpath_py, id="purepy")])
def impl(request):
    if request.param is None:
        pytest.fail("the compiled fast path is not built")
    return request.param

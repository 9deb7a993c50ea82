# Every use of picows internals by the compiled fast path, in one place.
#
# Matches picows 2.3.1 exactly (pinned in pyproject.toml; the Python half of
# this adapter, gateway/picows_adapter.py, checks the installed version).
# On a picows upgrade, re-read picows.pxd for these members first.
from picows.picows cimport MemoryBuffer, WSTransport


cdef inline int fast_write(WSTransport t, char* data, Py_ssize_t size) except -1:
    # picows' own zero-copy write: straight to the socket when nothing is
    # queued, else to the transport. No public API takes a pointer.
    t._fast_write(data, size)
    return 0


cdef inline int release_handshake_state(WSTransport t) except -1:
    # Idle connections are most connections: drop what picows keeps per
    # connection but the gateway never reads again. The upgrade request and
    # response (header dicts, ~1 KB) were used by the listener factory; the
    # 1 KiB frame buffer only serves pings, pongs and closes here, and grows
    # on demand.
    t._write_buffer = MemoryBuffer(32)
    t.request = None
    t.response = None
    return 0

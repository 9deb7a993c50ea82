# Every use of picows internals by the compiled fast path, in one place.
#
# Matches picows 2.3.1 exactly (pinned in pyproject.toml; the Python half of
# this adapter, gateway/picows_adapter.py, checks the installed version).
# On a picows upgrade, re-read picows.pxd for these members first.
from picows.picows cimport MemoryBuffer, WSTransport


cdef inline int socket_fd(WSTransport t):
    # The connection's socket, for writing to it directly (-1 under TLS,
    # where bytes must go through the transport's SSL layer).
    return -1 if t.is_secure else t._socket


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

# The compiled fast path's C-level interface (see _fastpath.pyx).
from libc.stdint cimport int64_t, uint64_t

from picows.picows cimport WSListener, WSTransport


cdef class ClientListener(WSListener):
    cdef:
        readonly WSTransport transport
        public object session            # gateway.session.Session: the control-plane state
        readonly list symbols            # routing state: subscribed symbols, insertion order
        readonly bint paused             # picows reported the write buffer over high water
        # Slow-consumer policy "conflate": while set, trades are held here,
        # newest per channel (channel -> [frame, skipped]), not sent.
        public bint conflating
        readonly dict conflated
        # While set, every trade for this client is kept in ``held`` as
        # (channel, seq, frame) instead of sent: a replay is being put in
        # front of the live stream (gateway.replay).
        public bint holding
        list held
        # After a replay: channel -> [epoch bytes, seq]; live trades at or
        # below the floor were already sent from the history and are skipped
        # until the live stream passes it. None when there is no floor.
        dict floors
        # Outbound batch: every trade frame one Redis read produces for this
        # client is appended here and leaves in one write (FanOut.flush).
        char* out
        Py_ssize_t out_len
        Py_ssize_t out_cap
        bint in_batch
        # The socket, written directly while the transport holds nothing
        # (see write_out); -1 means always through the transport (TLS).
        int fd
        # Set after a write the kernel took whole: the transport's buffer is
        # known to be empty without asking it. Every write to this client
        # goes through write_out, so nothing else can queue behind our back.
        bint wclean
        # A fragmented client message being reassembled (gateway.frames).
        public object frag
        # permessage-deflate was negotiated: trades go out compressed
        public bint deflate
        object _sink                     # frames go here when there is no transport (tests)

    cdef int conflate(self, object channel, const char* frame, Py_ssize_t size, int64_t seq) except -1
    cdef int hold(self, object channel, int64_t seq, const char* frame, Py_ssize_t size) except -1
    cdef bint below_floor(self, object channel, const char* epoch, Py_ssize_t elen, int64_t seq) except -1
    cdef int append_frame(self, const char* frame, Py_ssize_t size) except -1
    cdef int flush(self, Py_ssize_t max_buffered) except -1
    cdef int write_out(self, WSTransport t, const char* data, Py_ssize_t size) except -1
    cpdef send_text(self, bytes data)
    cpdef send_frame(self, bytes frame)
    cpdef flush_pending(self)


cdef class SymbolTable:
    cdef:
        readonly bytes prefix
        # Candle streams ("AAPL@1m") live on <candle_prefix><interval>:<SYMBOL>;
        # b"" when there are none. Neither prefix may start with the other.
        readonly bytes candle_prefix
        dict channels                    # channel bytes -> list[ClientListener]
        # Sequenced channels: channel -> [epoch bytes, last seq routed]; the
        # fan-out keeps it, and it goes with the channel's last subscriber.
        dict positions
        readonly Py_ssize_t subscription_count

    cpdef bytes channel_for(self, str symbol)
    cpdef str symbol_for(self, bytes channel)
    cpdef bint subscribe(self, ClientListener conn, str symbol) except -1
    cpdef bint unsubscribe(self, ClientListener conn, str symbol) except -1
    cpdef int remove_connection(self, ClientListener conn) except -1
    cpdef list lookup(self, bytes channel)


cdef class FanOut:
    cdef:
        readonly SymbolTable table
        list touched                     # clients with frames pending this batch
        char* scratch
        Py_ssize_t scratch_cap
        public Py_ssize_t max_buffered
        public object slow_consumer_callback
        # Counters (read by gateway.stats at log and scrape time)
        readonly uint64_t redis_messages
        readonly uint64_t frames_sent
        readonly uint64_t bytes_sent
        readonly uint64_t writes
        readonly uint64_t dropped_payloads
        readonly uint64_t unrouted_messages
        readonly uint64_t batches
        readonly uint64_t dispatch_errors
        readonly uint64_t conflated_messages
        readonly uint64_t compressed_messages
        readonly uint64_t sequenced_messages
        readonly uint64_t duplicate_messages   # sequenced trades at or below the channel's position
        readonly uint64_t candle_messages      # messages on candle channels with subscribers
        # Channels whose messages are held (payloads, in order) while a gap
        # in the gateway's own stream is filled from the history.
        dict holds
        public object gap_callback
        public Py_ssize_t compression_min_size  # shorter messages go plain to deflate clients too
        public double write_delay        # s a client's frames may wait to share a write (0: none)
        object flush_handle              # the pending timer of a coalesced write, or None
        uint64_t latency_counts[14]      # N_BUCKETS + 1 (+Inf)
        int64_t latency_sum_ns

    cdef int route(self, object channel, object payload, const char* ts, Py_ssize_t tslen) except -1
    cdef int _route_candle(self, object channel, list subs, object payload) except -1
    cdef int _deliver(self, object channel, list subs, Py_ssize_t size, const char* epoch,
                      Py_ssize_t elen, int64_t seq, int64_t conflate_seq) except -1
    cdef int flush(self) except -1
    cdef int end_of_read(self) except -1
    cdef void observe(self, int64_t elapsed_ns) noexcept
    cdef bytes _deflate_frame(self, Py_ssize_t size)
    cdef int _grow_scratch(self, Py_ssize_t size) except -1


cdef class SubscriptionReader:
    cdef:
        readonly FanOut fanout
        object reader                    # hiredis.Reader, one per Redis connection
        public object reply_callback     # every reply that is not a trade message
        readonly uint64_t messages       # trade messages read on this connection

    cdef int _handle(self, object reply, const char* ts, Py_ssize_t tslen) except -1

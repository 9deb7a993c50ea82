/*
 * loadclient: epoll WebSocket load client for the gateway fan-out benchmark.
 *
 * Opens N connections to HOST:PORT, performs the HTTP upgrade, waits for the
 * welcome frame, sends one masked subscribe frame per connection, waits for the
 * subscribe reply, prints "READY <ok> <failed>" on stdout, then counts received
 * data frames until every connection got its expected count, a deadline, an
 * idle timeout, or SIGTERM/SIGINT.  A JSON report goes to stdout at the end.
 *
 * Why C: a Python client costs ~0.75 us per frame and saturates its core near
 * 1M frames/s, which would measure the client, not the gateway.  Here the
 * per-frame work for most connections is one header parse; only every K-th
 * connection ("sampled") looks inside payloads, for latency ("ts", CLOCK_REALTIME
 * ns at publish) and per-symbol ordering ("seq" must go up by exactly 1).
 *
 * Connection file (-f): one line per connection:
 *     <expected data frames> SYM1 SYM2 ...
 *
 * permessage-deflate (RFC 7692, -z FRACTION): the chosen connections offer the
 * extension in the upgrade.  Frames with RSV1 set are counted on every
 * connection; only sampled connections inflate them (raw inflate of the payload
 * plus 00 00 ff ff) before looking for "seq" and "ts", so the client's cost per
 * frame stays one header parse everywhere else.
 *
 * Upgrade path (-P PATH, or -T FILE with one path per connection): e.g.
 * "/?token=<JWT>" for a gateway that authenticates at the upgrade.
 *
 * Subscribe messages (-J FILE): one JSON text per line, line i sent by
 * connection i (repeated if shorter) instead of the plain subscribe built from
 * the connection file's symbols (which still name what the connection checks),
 * e.g. with "since" for a resume (bench/replay_storm.py).  -o writes per
 * connection: got, expected, and the CLOCK_REALTIME ns at which it got its
 * expected count (0: never).
 *
 * Build: gcc -O2 -o loadclient loadclient.c -lz
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define MAX_SYMS 8
#define SYM_LEN 24
#define MAX_ATTEMPTS 8
#define READ_BUF (256 * 1024)

enum { ST_IDLE, ST_CONNECTING, ST_HTTP, ST_WELCOME, ST_SUBREPLY, ST_ACTIVE, ST_DEAD };

typedef struct {
    int fd;
    uint8_t state;
    uint8_t sampled;
    uint8_t attempts;
    uint8_t nsym;
    /* frame parser state: a header may be split across reads */
    uint8_t hdr[14];
    uint8_t hdr_have;
    uint8_t opcode;      /* opcode of the frame being read */
    uint8_t fin;
    uint8_t collect;     /* keep payload bytes of the current frame */
    uint8_t msg_opcode;  /* opcode of the first frame of a fragmented message */
    uint8_t msg_rsv1;    /* RSV1 of the message's first frame: payload is deflated */
    uint8_t offer;       /* offers permessage-deflate in the upgrade */
    uint8_t deflate;     /* the server agreed to permessage-deflate */
    uint64_t remain;     /* payload bytes still to come for the current frame */
    /* collected payload (handshake replies, sampled data, fragmented messages) */
    char *acc;
    uint32_t acc_len, acc_cap;
    uint8_t ctl[128];    /* control frame payload (<= 125 bytes by RFC 6455) */
    uint8_t ctl_len;
    /* HTTP response accumulation before the upgrade completes */
    char *http;
    uint32_t http_len;
    uint64_t got;        /* data messages received after subscribing */
    uint64_t expected;
    const char *path;    /* request target of the upgrade (NULL: opt_path) */
    const char *sub;     /* subscribe message (NULL: built from sym) */
    int64_t t_done;      /* CLOCK_REALTIME ns when got reached expected */
    char sym[MAX_SYMS][SYM_LEN];
    int64_t lastseq[MAX_SYMS];
} conn_t;

/* ---- options ----------------------------------------------------------- */
static const char *opt_host = "127.0.0.1";
static int opt_port = 0;
static const char *opt_file = NULL;
static double opt_deadline_s = 60;
static double opt_run_s = 0;       /* deadline counted from READY (0 = none) */
static int opt_sample = 16;
static int opt_idle_ms = 0;
static int opt_skip_ms = 0;
static int opt_inflight = 128;
static int opt_hold = 0;
static int opt_grace_ms = 0;
static int opt_keep_open = 0;     /* -K: after the report, keep every connection open until SIGTERM */
static const char *opt_counts_out = NULL;
static double opt_deflate = 0;     /* fraction of connections offering permessage-deflate */
static const char *opt_path = "/";
static const char *opt_paths_file = NULL;
static const char *opt_subs_file = NULL;

/* ---- global state ------------------------------------------------------ */
static conn_t *conns;
static int nconns;
static int epfd;
static volatile sig_atomic_t stop_flag = 0;
static uint64_t total_frames, expected_total, useful_frames;
static uint64_t n_ready, n_failed, n_retries, n_sub_errors, n_http_errors, n_server_closes;
static uint64_t n_closed_active, n_pings;
static uint64_t sampled_frames, seq_gaps, seq_dups, wrong_symbol, parse_errors;
static uint64_t reads, bytes_in;
/* permessage-deflate: data messages received while ACTIVE, with RSV1 and on
 * connections that negotiated it; frame bytes (header + payload) of each kind;
 * protocol faults (RSV bits where none may be) and inflate failures. */
static uint64_t compressed_frames, deflate_conn_frames, rsv_errors, ext_errors;
static uint64_t inflated_frames, inflated_in_bytes, inflated_out_bytes, inflate_errors;
static uint64_t wire_bytes_compressed, wire_bytes_plain;
static int64_t t_ready_ns, t_first_ns, t_last_ns, t_skip_until_ns;
static int ready_printed;
static double cpu_at_ready_s;
static struct sockaddr_in dst;
static uint32_t mask_state = 0x9e3779b9u;

/* latency histogram: 64 linear sub-buckets per power of two of nanoseconds
 * (~1.6% resolution), so percentiles cost nothing per sample. */
#define SUB 64
#define SUB_BITS 6
#define NBUCKETS (SUB + (64 - SUB_BITS) * SUB)
static uint64_t hist[NBUCKETS];
static uint64_t lat_count, lat_max_ns;
static double lat_sum_ns;

static int bucket_of(uint64_t v) {
    if (v < SUB) return (int)v;
    int e = 63 - __builtin_clzll(v);             /* e >= SUB_BITS */
    int sub = (int)((v >> (e - SUB_BITS)) & (SUB - 1));
    return SUB + (e - SUB_BITS) * SUB + sub;
}
static uint64_t bucket_upper(int i) {            /* exclusive upper bound, ns */
    if (i < SUB) return (uint64_t)i + 1;
    int e = (i - SUB) / SUB + SUB_BITS, sub = (i - SUB) % SUB;
    return ((uint64_t)(SUB + sub + 1)) << (e - SUB_BITS);
}
static void record_latency(int64_t ns) {
    if (ns < 0) ns = 0;
    hist[bucket_of((uint64_t)ns)]++;
    lat_count++;
    lat_sum_ns += (double)ns;
    if ((uint64_t)ns > lat_max_ns) lat_max_ns = (uint64_t)ns;
}
static double percentile_us(double q) {
    if (!lat_count) return 0;
    uint64_t rank = (uint64_t)(q * (double)lat_count);
    if (rank >= lat_count) rank = lat_count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) {
            uint64_t up = bucket_upper(i);
            if (up > lat_max_ns) up = lat_max_ns;  /* never report above the max */
            return (double)up / 1000.0;
        }
    }
    return (double)lat_max_ns / 1000.0;
}

static int64_t now_real_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static int64_t now_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static void die(const char *msg) {
    fprintf(stderr, "loadclient: %s: %s\n", msg, strerror(errno));
    exit(2);
}

/* ---- sending ----------------------------------------------------------- */

/* Client frames must be masked (RFC 6455 5.3); the key need not be strong. */
static int send_masked(conn_t *c, int opcode, const char *payload, size_t len) {
    uint8_t buf[16 + 1024];
    size_t h = 0;
    if (len > 1024) return -1;
    buf[h++] = 0x80 | (uint8_t)opcode;
    if (len < 126) {
        buf[h++] = 0x80 | (uint8_t)len;
    } else {
        buf[h++] = 0x80 | 126;
        buf[h++] = (uint8_t)(len >> 8);
        buf[h++] = (uint8_t)len;
    }
    mask_state = mask_state * 1664525u + 1013904223u;
    uint8_t key[4];
    memcpy(key, &mask_state, 4);
    memcpy(buf + h, key, 4);
    h += 4;
    for (size_t i = 0; i < len; i++) buf[h + i] = (uint8_t)payload[i] ^ key[i & 3];
    ssize_t w = send(c->fd, buf, h + len, MSG_NOSIGNAL);
    return w == (ssize_t)(h + len) ? 0 : -1;
}

static int send_subscribe(conn_t *c) {
    if (c->sub) return send_masked(c, 1, c->sub, strlen(c->sub));
    char msg[512];
    int n = snprintf(msg, sizeof msg, "{\"action\":\"subscribe\",\"symbols\":[");
    for (int i = 0; i < c->nsym; i++)
        n += snprintf(msg + n, sizeof msg - n, "%s\"%s\"", i ? "," : "", c->sym[i]);
    n += snprintf(msg + n, sizeof msg - n, "]}");
    return send_masked(c, 1, msg, (size_t)n);
}

/* ---- connection lifecycle --------------------------------------------- */

static int pending_next = 0;   /* next connection index never started */
static int inflight = 0;       /* connections between connect() and ACTIVE */
static int *retry_q, retry_head, retry_tail;

static void check_ready(void) {
    if (!ready_printed && n_ready + n_failed == (uint64_t)nconns) {
        ready_printed = 1;
        t_ready_ns = now_real_ns();
        /* CPU spent connecting is reported apart from CPU spent receiving. */
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        cpu_at_ready_s = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                         ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
        printf("READY %llu %llu\n", (unsigned long long)n_ready, (unsigned long long)n_failed);
        fflush(stdout);
    }
}

static void reset_parser(conn_t *c) {
    c->hdr_have = 0;
    c->remain = 0;
    c->acc_len = 0;
    c->http_len = 0;
    c->ctl_len = 0;
}

/* A connection failed before it became ACTIVE: retry a few times (the listen
 * backlog can overflow while thousands of connections open at once). */
static void fail_setup(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    inflight--;
    if (++c->attempts < MAX_ATTEMPTS && !stop_flag) {
        c->state = ST_IDLE;
        n_retries++;
        retry_q[retry_tail++ % nconns] = (int)(c - conns);
    } else {
        c->state = ST_DEAD;
        n_failed++;
        check_ready();
    }
}

static void close_active(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_DEAD;
    n_closed_active++;
}

static void start_connect(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket (raise ulimit -n?)");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->deflate = 0;      /* negotiated anew on every attempt */
    c->msg_rsv1 = 0;
    reset_parser(c);
    inflight++;
    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (r == 0 || errno == EINPROGRESS) {
        c->state = ST_CONNECTING;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    } else {
        c->state = ST_CONNECTING;
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
        fail_setup(c);
    }
}

static void pump_connects(void) {
    while (inflight < opt_inflight && !stop_flag) {
        if (retry_head < retry_tail) {
            start_connect(&conns[retry_q[retry_head++ % nconns]]);
        } else if (pending_next < nconns) {
            start_connect(&conns[pending_next++]);
        } else {
            break;
        }
    }
}

/* ---- permessage-deflate ----------------------------------------------- */

/* Which connections offer the extension: connection i offers when the
 * fractional part of i * (golden ratio) is below the fraction.  That spreads
 * the chosen ones evenly and independently of the sampling stride, so with half
 * the connections compressed the sampled ones (every K-th) are of both kinds. */
static int offers_deflate(int i) {
    if (opt_deflate >= 1.0) return 1;
    if (opt_deflate <= 0.0) return 0;
    double x = (double)i * 0.6180339887498949;
    return x - (double)(int64_t)x < opt_deflate;
}

static z_stream zs;
static int zs_ready;
static uint8_t *zout;
static size_t zout_cap;

/* Inflate one compressed message into zout; returns its length or -1.
 * Both sides agreed on no context takeover, so each message starts from an
 * empty window and one inflater, reset per message, serves every connection
 * (RFC 7692 7.2.2: raw deflate; the sender dropped the final 00 00 ff ff of
 * its sync flush, the receiver appends it back). */
static ssize_t inflate_message(const uint8_t *p, size_t n) {
    static const uint8_t tail[4] = {0x00, 0x00, 0xff, 0xff};
    if (!zs_ready) {
        if (inflateInit2(&zs, -15) != Z_OK) { fprintf(stderr, "loadclient: inflateInit2\n"); exit(2); }
        zout_cap = 64 * 1024;
        zout = malloc(zout_cap);
        if (!zout) die("malloc");
        zs_ready = 1;
    } else if (inflateReset(&zs) != Z_OK) {
        return -1;
    }
    const uint8_t *part[2] = {p, tail};
    size_t part_len[2] = {n, sizeof tail};
    size_t have = 0;
    for (int i = 0; i < 2; i++) {
        zs.next_in = (Bytef *)part[i];
        zs.avail_in = (uInt)part_len[i];
        for (;;) {
            if (zout_cap - have < 4096) {
                zout_cap *= 2;
                zout = realloc(zout, zout_cap);
                if (!zout) die("realloc");
            }
            zs.next_out = zout + have;
            zs.avail_out = (uInt)(zout_cap - have);
            int r = inflate(&zs, Z_NO_FLUSH);
            have = (size_t)(zs.next_out - zout);
            if (r == Z_STREAM_END) goto done;   /* a final block (RFC 7692 7.2.3.4): the message ends */
            if (r == Z_BUF_ERROR) break;                   /* input used up */
            if (r != Z_OK) return -1;                      /* corrupt data */
            if (zs.avail_in == 0 && zs.avail_out != 0) break;
        }
    }
done:
    inflated_frames++;
    inflated_in_bytes += n;
    inflated_out_bytes += have;
    return (ssize_t)have;
}

/* ---- payload inspection (sampled connections only) --------------------- */

static const char *find_key(const char *p, size_t n, const char *key, size_t klen) {
    const char *k = memmem(p, n, key, klen);
    if (!k) return NULL;
    k += klen;
    const char *end = p + n;
    while (k < end && (*k == ' ')) k++;   /* json.dumps writes '": ' */
    return k < end ? k : NULL;
}
static int parse_i64(const char *p, const char *end, int64_t *out) {
    int64_t v = 0;
    int any = 0;
    while (p < end && *p >= '0' && *p <= '9') { v = v * 10 + (*p - '0'); p++; any = 1; }
    *out = v;
    return any ? 0 : -1;
}

static void inspect_sampled(conn_t *c, const char *p, size_t n, int64_t now) {
    const char *end = p + n, *k;
    int64_t ts, seq;
    sampled_frames++;
    if (!(k = find_key(p, n, "\"ts\":", 5)) || parse_i64(k, end, &ts) < 0) { parse_errors++; return; }
    if (now >= t_skip_until_ns) record_latency(now - ts);
    if (!(k = find_key(p, n, "\"seq\":", 6)) || parse_i64(k, end, &seq) < 0) { parse_errors++; return; }
    if (!(k = find_key(p, n, "\"symbol\":", 9)) || *k != '"') { parse_errors++; return; }
    k++;
    const char *q = memchr(k, '"', (size_t)(end - k));
    if (!q || q - k >= SYM_LEN) { parse_errors++; return; }
    size_t sl = (size_t)(q - k);
    for (int i = 0; i < c->nsym; i++) {
        if (strlen(c->sym[i]) == sl && memcmp(c->sym[i], k, sl) == 0) {
            if (seq == c->lastseq[i] + 1) c->lastseq[i] = seq;
            else if (seq > c->lastseq[i] + 1) { seq_gaps++; c->lastseq[i] = seq; }
            else seq_dups++;
            return;
        }
    }
    wrong_symbol++;   /* delivered a symbol this connection never subscribed to */
}

/* ---- frame handling ---------------------------------------------------- */

static int contains(const char *p, size_t n, const char *s) {
    return memmem(p, n, s, strlen(s)) != NULL;
}

/* A complete data message (text or binary, all fragments joined). */
static void on_message(conn_t *c, const char *p, size_t n, int64_t now) {
    switch (c->state) {
    case ST_WELCOME:
        /* welcome: {"type":"success","message":"Connected to WebSocket Gateway",...} */
        if (!contains(p, n, "success") || send_subscribe(c) < 0) {
            n_http_errors++;
            fail_setup(c);
            return;
        }
        c->state = ST_SUBREPLY;
        return;
    case ST_SUBREPLY:
        if (!contains(p, n, "success")) {
            n_sub_errors++;
            if (n_sub_errors <= 3) fprintf(stderr, "loadclient: subscribe reply: %.*s\n", (int)n, p);
        }
        c->state = ST_ACTIVE;
        inflight--;
        n_ready++;
        check_ready();
        return;
    case ST_ACTIVE:
        c->got++;
        total_frames++;
        if (c->got <= c->expected) useful_frames++;  /* extras must not hide losses */
        if (c->got == c->expected) c->t_done = now;
        if (!t_first_ns) {
            t_first_ns = now;
            t_skip_until_ns = now + (int64_t)opt_skip_ms * 1000000LL;
        }
        t_last_ns = now;
        if (c->deflate) deflate_conn_frames++;
        if (c->msg_rsv1) compressed_frames++;
        /* p is NULL here only when a compressed payload failed to inflate
         * (counted in inflate_errors): nothing to inspect. */
        if (c->sampled && p) inspect_sampled(c, p, n, now);
        return;
    default:
        return;
    }
}

static void on_control(conn_t *c, int opcode, const uint8_t *p, size_t n) {
    if (opcode == 9) {            /* ping: answer with a pong carrying its payload */
        n_pings++;
        send_masked(c, 10, (const char *)p, n);
    } else if (opcode == 8) {     /* close: the server gave up on us */
        n_server_closes++;
        if (n_server_closes <= 3)
            fprintf(stderr, "loadclient: server close frame on conn %d\n", (int)(c - conns));
    }
}

static void acc_append(conn_t *c, const uint8_t *p, size_t n) {
    if (c->acc_len + n > c->acc_cap) {
        uint32_t cap = c->acc_cap ? c->acc_cap : 512;
        while (cap < c->acc_len + n) cap *= 2;
        c->acc = realloc(c->acc, cap);
        if (!c->acc) die("realloc");
        c->acc_cap = cap;
    }
    memcpy(c->acc + c->acc_len, p, n);
    c->acc_len += (uint32_t)n;
}

static size_t header_len(const uint8_t *h) {
    size_t l = 2;
    uint8_t len7 = h[1] & 0x7f;
    if (len7 == 126) l += 2;
    else if (len7 == 127) l += 8;
    if (h[1] & 0x80) l += 4;     /* servers must not mask, but tolerate it */
    return l;
}

static void begin_frame(conn_t *c, const uint8_t *h) {
    uint8_t len7 = h[1] & 0x7f;
    uint64_t len = len7;
    if (len7 == 126) len = ((uint64_t)h[2] << 8) | h[3];
    else if (len7 == 127) { len = 0; for (int i = 2; i < 10; i++) len = (len << 8) | h[i]; }
    uint8_t rsv1 = h[0] & 0x40;
    c->fin = h[0] >> 7;
    c->opcode = h[0] & 0x0f;
    c->remain = len;
    c->ctl_len = 0;
    /* RSV2/RSV3 are never defined here; RSV1 only on the first frame of a data
     * message, and only where permessage-deflate was agreed (RFC 7692 6). */
    if ((h[0] & 0x30) || (rsv1 && (c->opcode == 0 || c->opcode >= 8 || !c->deflate)))
        rsv_errors++;
    if (c->opcode >= 8) {
        c->collect = 1;
    } else {
        if (c->opcode != 0) {
            c->msg_opcode = c->opcode;
            c->msg_rsv1 = rsv1 ? 1 : 0;
            c->acc_len = 0;
        }
        /* Payload bytes matter only before ACTIVE and on sampled connections. */
        c->collect = (c->state != ST_ACTIVE) || c->sampled;
        if (c->state == ST_ACTIVE) {
            uint64_t fb = header_len(h) + len;
            if (c->msg_rsv1) wire_bytes_compressed += fb;
            else wire_bytes_plain += fb;
        }
    }
}

/* A complete message whose payload was kept: inflate it first if RSV1 said it
 * is compressed.  A payload that does not inflate still counts as a received
 * frame (the count is what loss is measured on) but is not inspected. */
static void deliver(conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    if (!c->msg_rsv1) {
        on_message(c, (const char *)p, n, now);
        return;
    }
    ssize_t m = inflate_message(p, n);
    if (m < 0) {
        inflate_errors++;
        if (inflate_errors <= 3) fprintf(stderr, "loadclient: inflate failed on conn %d\n", (int)(c - conns));
        if (c->state == ST_ACTIVE) on_message(c, NULL, 0, now);
        else { n_http_errors++; fail_setup(c); }
        return;
    }
    on_message(c, (const char *)zout, (size_t)m, now);
}

/* The current frame's payload is complete; `inplace` is the whole payload when
 * it was contiguous in the read buffer and nothing was accumulated. */
static void end_frame(conn_t *c, const uint8_t *inplace, size_t inlen, int64_t now) {
    if (c->opcode >= 8) {
        on_control(c, c->opcode, inplace ? inplace : c->ctl, inplace ? inlen : c->ctl_len);
        return;
    }
    if (!c->fin) {               /* more fragments to come: keep what we have */
        if (c->collect && inplace) acc_append(c, inplace, inlen);
        return;
    }
    if (!c->collect) {
        on_message(c, NULL, 0, now);
    } else if (inplace && c->acc_len == 0) {
        deliver(c, inplace, inlen, now);
    } else {
        if (inplace) acc_append(c, inplace, inlen);
        deliver(c, (const uint8_t *)c->acc, c->acc_len, now);
        c->acc_len = 0;
    }
}

static void feed_frames(conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    while (n && c->state >= ST_WELCOME && c->state <= ST_ACTIVE) {
        if (c->remain) {                       /* inside a payload */
            size_t take = c->remain < n ? (size_t)c->remain : n;
            if (c->collect) {
                if (c->opcode >= 8) {
                    size_t room = sizeof c->ctl - c->ctl_len;
                    size_t t = take < room ? take : room;
                    memcpy(c->ctl + c->ctl_len, p, t);
                    c->ctl_len += (uint8_t)t;
                } else {
                    acc_append(c, p, take);
                }
            }
            p += take; n -= take; c->remain -= take;
            if (!c->remain) end_frame(c, NULL, 0, now);
            continue;
        }
        if (c->hdr_have == 0 && n >= 2 && n >= header_len(p)) {
            /* fast path: the whole header is in this read */
            size_t hl = header_len(p);
            begin_frame(c, p);
            p += hl; n -= hl;
            if (c->remain <= n) {              /* and the whole payload too */
                size_t pl = (size_t)c->remain;
                c->remain = 0;
                end_frame(c, c->collect ? p : NULL, pl, now);
                p += pl; n -= pl;
            }
            continue;
        }
        /* slow path: a header split across reads */
        c->hdr[c->hdr_have++] = *p++;
        n--;
        if (c->hdr_have >= 2 && c->hdr_have == header_len(c->hdr)) {
            begin_frame(c, c->hdr);
            c->hdr_have = 0;
            if (!c->remain) end_frame(c, NULL, 0, now);
        }
    }
}

/* Accumulate the HTTP response; once complete, check for 101 and hand any
 * bytes after the blank line to the frame parser. */
static void feed_http(conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    if (!c->http) c->http = malloc(4096);
    if (c->http_len + n > 4095) { n_http_errors++; fail_setup(c); return; }
    memcpy(c->http + c->http_len, p, n);
    c->http_len += (uint32_t)n;
    c->http[c->http_len] = 0;
    char *eoh = strstr(c->http, "\r\n\r\n");
    if (!eoh) return;
    if (strncmp(c->http, "HTTP/1.1 101", 12) != 0) {
        n_http_errors++;
        if (n_http_errors <= 3) fprintf(stderr, "loadclient: upgrade refused: %.60s\n", c->http);
        fail_setup(c);
        return;
    }
    /* Did the server agree to permessage-deflate?  Agreeing to an extension
     * the client never offered fails the connection (RFC 6455 4.1). */
    *eoh = 0;
    const char *ext = strcasestr(c->http, "\r\nSec-WebSocket-Extensions:");
    int agreed = 0;
    if (ext) {
        const char *eol = strstr(ext + 2, "\r\n");
        size_t linelen = eol ? (size_t)(eol - ext) : strlen(ext);
        agreed = memmem(ext, linelen, "permessage-deflate", 18) != NULL;
    }
    *eoh = '\r';
    if (agreed && !c->offer) {
        ext_errors++;
        n_http_errors++;
        fail_setup(c);
        return;
    }
    c->deflate = (uint8_t)agreed;
    size_t used = (size_t)(eoh + 4 - c->http);
    size_t rest = c->http_len - used;
    c->state = ST_WELCOME;
    uint8_t tmp[4096];
    memcpy(tmp, c->http + used, rest);
    free(c->http);
    c->http = NULL;
    c->http_len = 0;
    if (rest) feed_frames(c, tmp, rest, now);
}

static uint8_t rbuf[READ_BUF];

/* The upgrade request: the connection's path (a token in the query string, if
 * any) and, where chosen, the permessage-deflate offer as browsers send it. */
static int build_request(conn_t *c, char *buf, size_t cap) {
    return snprintf(buf, cap,
                    "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n%s\r\n",
                    c->path ? c->path : opt_path, opt_host, opt_port,
                    c->offer ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "");
}

static void on_event(conn_t *c, uint32_t ev) {
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (ev & (EPOLLERR | EPOLLHUP))) { fail_setup(c); return; }
        if (!(ev & EPOLLOUT)) return;
        char req[4096];
        int len = build_request(c, req, sizeof req);
        if (send(c->fd, req, (size_t)len, MSG_NOSIGNAL) != len) { fail_setup(c); return; }
        c->state = ST_HTTP;
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
        return;
    }
    if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    ssize_t r = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (c->state == ST_ACTIVE) close_active(c);
        else fail_setup(c);
        return;
    }
    reads++;
    bytes_in += (uint64_t)r;
    /* One clock read per recv(), not per frame: every frame in this buffer
     * arrived together, so they share the receive time. */
    int64_t now = now_real_ns();
    if (c->state == ST_HTTP) feed_http(c, rbuf, (size_t)r, now);
    else feed_frames(c, rbuf, (size_t)r, now);
}

/* ---- setup ------------------------------------------------------------- */

static void load_conns(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die("open connection file");
    int cap = 1024;
    conns = calloc((size_t)cap, sizeof *conns);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *save = NULL, *tok = strtok_r(line, " \t\r\n", &save);
        if (!tok) continue;
        if (nconns == cap) {
            cap *= 2;
            conns = realloc(conns, (size_t)cap * sizeof *conns);
            memset(conns + nconns, 0, (size_t)(cap - nconns) * sizeof *conns);
        }
        conn_t *c = &conns[nconns];
        c->fd = -1;
        c->expected = strtoull(tok, NULL, 10);
        expected_total += c->expected;
        while ((tok = strtok_r(NULL, " \t\r\n", &save)) && c->nsym < MAX_SYMS) {
            snprintf(c->sym[c->nsym], SYM_LEN, "%s", tok);
            c->lastseq[c->nsym] = 0;
            c->nsym++;
        }
        c->sampled = opt_sample > 0 && (nconns % opt_sample) == 0;
        c->offer = (uint8_t)offers_deflate(nconns);
        nconns++;
    }
    fclose(f);
}

/* A request target must be one token of the request line: no spaces, no
 * control characters, and (for the request buffer) not too long. */
static int valid_path(const char *p) {
    if (p[0] != '/' || strlen(p) > 3000) return 0;
    for (; *p; p++)
        if ((unsigned char)*p <= 0x20 || *p == 0x7f) return 0;
    return 1;
}

/* The non-empty lines of a file, newline stripped; exits 2 on a line that
 * check() refuses (what names the file in messages) or an empty file. */
static char **read_lines(const char *path, const char *what, int (*check)(const char *, ssize_t),
                         size_t *count) {
    FILE *f = fopen(path, "r");
    if (!f) die(what);
    char **lines = NULL;
    size_t n = 0, cap = 0, len = 0;
    char *line = NULL;
    ssize_t r;
    while ((r = getline(&line, &len, f)) >= 0) {
        while (r > 0 && (line[r - 1] == '\n' || line[r - 1] == '\r')) line[--r] = 0;
        if (!r) continue;
        if (!check(line, r)) { fprintf(stderr, "loadclient: bad line in %s %s\n", what, path); exit(2); }
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            lines = realloc(lines, cap * sizeof *lines);
            if (!lines) die("realloc");
        }
        lines[n++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (!n) { fprintf(stderr, "loadclient: empty %s %s\n", what, path); exit(2); }
    *count = n;
    return lines;
}

static int path_line(const char *line, ssize_t len) { (void)len; return valid_path(line); }
static int sub_line(const char *line, ssize_t len) { (void)line; return len <= 1024; }

/* -T: line i is connection i's path; fewer lines than connections repeat. */
static void load_paths(const char *path) {
    size_t n;
    char **lines = read_lines(path, "paths file", path_line, &n);
    for (int i = 0; i < nconns; i++) conns[i].path = lines[(size_t)i % n];
}

/* -J: line i is connection i's subscribe message (at most 1024 bytes). */
static void load_subs(const char *path) {
    size_t n;
    char **lines = read_lines(path, "subscribe file", sub_line, &n);
    for (int i = 0; i < nconns; i++) conns[i].sub = lines[(size_t)i % n];
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient -p PORT -f CONNFILE [-H host] [-d deadline_s] [-D deadline_after_ready_s]\n"
            "                  [-s sample_every]\n"
            "                  [-i idle_ms] [-k latency_skip_ms] [-m max_inflight_connects]\n"
            "                  [-g grace_ms] [-w (hold: no expectations, run to deadline/SIGTERM)]\n"
            "                  [-o per_connection_counts_file]\n"
            "                  [-z fraction offering permessage-deflate (0..1)]\n"
            "                  [-P upgrade_path (default /)] [-T file: one upgrade path per connection]\n"
            "                  [-J file: one subscribe message per connection]\n");
    exit(2);
}

static void report(const char *reason, double connect_s) {
    uint64_t missing = 0, extra = 0, short_c = 0, over_c = 0, mn = UINT64_MAX, mx = 0;
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->got < c->expected) { missing += c->expected - c->got; short_c++; }
        if (c->got > c->expected) { extra += c->got - c->expected; over_c++; }
        if (c->got < mn) mn = c->got;
        if (c->got > mx) mx = c->got;
    }
    if (!nconns) mn = 0;
    if (opt_counts_out) {
        FILE *f = fopen(opt_counts_out, "w");
        if (f) {
            for (int i = 0; i < nconns; i++)
                fprintf(f, "%llu %llu %lld\n", (unsigned long long)conns[i].got,
                        (unsigned long long)conns[i].expected, (long long)conns[i].t_done);
            fclose(f);
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    int sampled = 0;
    for (int i = 0; i < nconns; i++) sampled += conns[i].sampled;
    printf("{\"stop_reason\":\"%s\",\"conns\":%d,\"ready\":%llu,\"connect_failures\":%llu,"
           "\"connect_retries\":%llu,\"upgrade_errors\":%llu,\"subscribe_errors\":%llu,"
           "\"server_closes\":%llu,\"closed_while_active\":%llu,\"pings\":%llu,"
           "\"connect_s\":%.3f,",
           reason, nconns, (unsigned long long)n_ready, (unsigned long long)n_failed,
           (unsigned long long)n_retries, (unsigned long long)n_http_errors,
           (unsigned long long)n_sub_errors, (unsigned long long)n_server_closes,
           (unsigned long long)n_closed_active, (unsigned long long)n_pings, connect_s);
    printf("\"frames_total\":%llu,\"expected_total\":%llu,\"missing\":%llu,\"extra\":%llu,"
           "\"conns_short\":%llu,\"conns_over\":%llu,\"per_conn_min\":%llu,\"per_conn_max\":%llu,",
           (unsigned long long)total_frames, (unsigned long long)expected_total,
           (unsigned long long)missing, (unsigned long long)extra, (unsigned long long)short_c,
           (unsigned long long)over_c, (unsigned long long)mn, (unsigned long long)mx);
    printf("\"sampled_conns\":%d,\"sampled_frames\":%llu,\"seq_gaps\":%llu,\"seq_dups\":%llu,"
           "\"wrong_symbol\":%llu,\"parse_errors\":%llu,",
           sampled, (unsigned long long)sampled_frames, (unsigned long long)seq_gaps,
           (unsigned long long)seq_dups, (unsigned long long)wrong_symbol,
           (unsigned long long)parse_errors);
    int deflate_conns = 0, offered = 0;
    for (int i = 0; i < nconns; i++) {
        deflate_conns += conns[i].deflate;
        offered += conns[i].offer;
    }
    printf("\"deflate_offered\":%d,\"deflate_conns\":%d,\"compressed_frames\":%llu,"
           "\"deflate_conn_frames\":%llu,\"rsv_errors\":%llu,\"extension_errors\":%llu,"
           "\"inflated_frames\":%llu,\"inflated_in_bytes\":%llu,\"inflated_out_bytes\":%llu,"
           "\"inflate_errors\":%llu,\"wire_bytes_compressed\":%llu,\"wire_bytes_plain\":%llu,",
           offered, deflate_conns, (unsigned long long)compressed_frames,
           (unsigned long long)deflate_conn_frames, (unsigned long long)rsv_errors,
           (unsigned long long)ext_errors, (unsigned long long)inflated_frames,
           (unsigned long long)inflated_in_bytes, (unsigned long long)inflated_out_bytes,
           (unsigned long long)inflate_errors, (unsigned long long)wire_bytes_compressed,
           (unsigned long long)wire_bytes_plain);
    printf("\"latency_us\":{\"count\":%llu,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,"
           "\"p999\":%.1f,\"max\":%.1f},",
           (unsigned long long)lat_count, lat_count ? lat_sum_ns / (double)lat_count / 1000.0 : 0.0,
           percentile_us(0.50), percentile_us(0.90), percentile_us(0.99), percentile_us(0.999),
           (double)lat_max_ns / 1000.0);
    printf("\"latency_hist\":[");
    int first = 1;
    for (int i = 0; i < NBUCKETS; i++) {
        if (!hist[i]) continue;
        printf("%s[%.3f,%llu]", first ? "" : ",", (double)bucket_upper(i) / 1000.0,
               (unsigned long long)hist[i]);
        first = 0;
    }
    printf("],\"t_ready_ns\":%lld,\"t_first_ns\":%lld,\"t_last_ns\":%lld,"
           "\"reads\":%llu,\"bytes\":%llu,\"cpu_user_s\":%.4f,\"cpu_sys_s\":%.4f,"
           "\"cpu_at_ready_s\":%.4f,\"max_rss_kb\":%ld}\n",
           (long long)t_ready_ns, (long long)t_first_ns, (long long)t_last_ns,
           (unsigned long long)reads, (unsigned long long)bytes_in,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, cpu_at_ready_s, ru.ru_maxrss);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int o;
    while ((o = getopt(argc, argv, "H:p:f:d:D:s:i:k:m:g:wKo:z:P:T:J:")) != -1) {
        switch (o) {
        case 'H': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 'f': opt_file = optarg; break;
        case 'd': opt_deadline_s = atof(optarg); break;
        case 'D': opt_run_s = atof(optarg); break;
        case 's': opt_sample = atoi(optarg); break;
        case 'i': opt_idle_ms = atoi(optarg); break;
        case 'k': opt_skip_ms = atoi(optarg); break;
        case 'm': opt_inflight = atoi(optarg); break;
        case 'g': opt_grace_ms = atoi(optarg); break;
        case 'w': opt_hold = 1; break;
        case 'K': opt_keep_open = 1; break;
        case 'o': opt_counts_out = optarg; break;
        case 'z': opt_deflate = atof(optarg); break;
        case 'P': opt_path = optarg; break;
        case 'T': opt_paths_file = optarg; break;
        case 'J': opt_subs_file = optarg; break;
        default: usage();
        }
    }
    if (!opt_port || !opt_file) usage();
    if (!valid_path(opt_path)) { fprintf(stderr, "loadclient: bad -P path\n"); return 2; }

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    load_conns(opt_file);
    if (!nconns) { fprintf(stderr, "loadclient: empty connection file\n"); return 2; }
    retry_q = calloc((size_t)nconns, sizeof *retry_q);
    if (opt_paths_file) load_paths(opt_paths_file);
    if (opt_subs_file) load_subs(opt_subs_file);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &dst.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    int64_t t0 = now_mono_ns();
    int64_t deadline = t0 + (int64_t)(opt_deadline_s * 1e9);
    int64_t ready_mono = 0, done_at = 0, last_progress = t0;
    uint64_t last_total = 0;
    const char *reason = "deadline";
    struct epoll_event evs[1024];

    for (;;) {
        pump_connects();
        int n = epoll_wait(epfd, evs, 1024, 20);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) on_event((conn_t *)evs[i].data.ptr, evs[i].events);

        int64_t m = now_mono_ns();
        if (ready_printed && !ready_mono) ready_mono = m;
        if (stop_flag) { reason = opt_hold ? "hold" : "signal"; break; }
        if (m >= deadline) { reason = "deadline"; break; }
        if (ready_mono && opt_run_s > 0 && m - ready_mono >= (int64_t)(opt_run_s * 1e9)) {
            reason = "deadline";
            break;
        }
        if (!ready_printed || opt_hold) continue;
        if (total_frames != last_total) { last_total = total_frames; last_progress = m; }
        if (expected_total && useful_frames >= expected_total) {
            /* everything expected arrived; optionally linger to catch extras */
            if (!done_at) done_at = m;
            if (m - done_at >= (int64_t)opt_grace_ms * 1000000LL) { reason = "expected"; break; }
        }
        if (opt_idle_ms && total_frames && m - last_progress >= (int64_t)opt_idle_ms * 1000000LL) {
            reason = "idle";
            break;
        }
    }
    double connect_s = ready_mono ? (double)(ready_mono - t0) / 1e9 : -1;
    report(reason, connect_s);
    /* With -K the connections stay open until SIGTERM, so that the gateway's
       CPU can be read after the last delivery and before it tears down a
       thousand connections (which the floor does far more cheaply). */
    while (opt_keep_open && !stop_flag) pause();
    /* Closing thousands of sockets is left to exit(): the kernel does it faster. */
    return 0;
}

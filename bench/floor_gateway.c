/*
 * floor_gateway: the smallest gateway of the same design, in C, as the floor
 * the benchmark sets the real gateway against.
 *
 * Same design as gateway/: one epoll loop on one core; one Redis connection
 * with PSUBSCRIBE <prefix>*, read through a 1 MiB buffer; per Redis read, each
 * trade's WebSocket frame {"type":"trade","data":<payload>,"timestamp":<ms>}
 * is built once and appended to every subscriber's output buffer, and at the
 * end of the read every client that got something is written with ONE send()
 * (non-blocking; what the socket does not take waits for EPOLLOUT).  What it
 * leaves out: /metrics, /readyz, limits, heartbeats, compression, sequencing,
 * replays, candles.  Enough of the protocol for bench/loadclient.c: the
 * upgrade (Sec-WebSocket-Accept), the welcome message, subscribe /
 * unsubscribe / ping replies, ping and close frames.
 *
 * Usage: floor_gateway -p PORT -r REDIS_PORT [-H HOST] [-R REDIS_HOST] [-P PREFIX]
 * SIGUSR1 prints one line "STATS {json}" on stdout (counters since start:
 * frames delivered, client sends, Redis reads and messages); SIGTERM or
 * SIGINT prints it once more and exits 0.
 *
 * Build: gcc -O2 -o floor_gateway floor_gateway.c [-DHAVE_OPENSSL -lcrypto]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
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

#ifdef HAVE_OPENSSL
#include <openssl/sha.h>
#endif

#define REDIS_BUF (1 << 20)      /* the gateway's Redis read size */
#define MAX_SYMS 5               /* per connection, as WS_MAX_SYMBOLS in the bench */
#define SYM_LEN 32
#define HTTP_MAX 8192
#define IN_MAX 4096             /* largest client frame: a subscribe is < 1 KiB */
#define TABLE_SLOTS (1 << 17)    /* symbols; open addressing, never more than half full */

enum { C_HTTP, C_WS, C_CLOSING };

typedef struct client {
    int fd;
    uint8_t state;
    uint8_t want_out;            /* EPOLLOUT armed: out holds bytes the socket refused */
    uint8_t touched;             /* in this read's list of clients to flush */
    uint8_t nsym;
    int sym[MAX_SYMS];           /* symbol table indices */
    char *in;                    /* bytes from the client not yet parsed */
    uint32_t in_len;
    char *out;                   /* bytes to send: out[out_off..out_len) */
    size_t out_len, out_off, out_cap;
} client_t;

typedef struct {
    char name[SYM_LEN];          /* upper-case symbol, "" = free slot */
    int *subs;                   /* client fds */
    int nsubs, cap;
} symbol_t;

static const char *opt_host = "127.0.0.1", *opt_redis_host = "127.0.0.1";
static const char *opt_prefix = "channel:trade:";
static int opt_port, opt_redis_port;

static int epfd, lfd, rfd;
static client_t **clients;       /* by fd */
static int nclients_cap;
static symbol_t *table;
static int *touched;
static int ntouched, touched_cap;
static char *rbuf;
static size_t rlen;
static char *scratch;            /* one trade frame */
static size_t scratch_cap;
static volatile sig_atomic_t want_stats, want_stop;
static uint64_t conn_seq;

/* counters (SIGUSR1 / exit) */
static uint64_t st_frames, st_frame_bytes, st_sends, st_send_eagain, st_flushes;
static uint64_t st_redis_reads, st_redis_bytes, st_redis_messages, st_unrouted, st_accepted;

static void die(const char *msg) {
    fprintf(stderr, "floor_gateway: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) die("realloc");
    return q;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- SHA-1 and base64 for Sec-WebSocket-Accept ------------------------- */

#ifndef HAVE_OPENSSL
/* FIPS 180-1, enough for one short message per upgrade. */
static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d; d = c; c = rol(b, 30); b = a; a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void SHA1(const unsigned char *msg, size_t n, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    uint8_t blk[64];
    size_t i = 0;
    for (; i + 64 <= n; i += 64) sha1_block(h, msg + i);
    size_t r = n - i;
    memset(blk, 0, sizeof blk);
    memcpy(blk, msg + i, r);
    blk[r] = 0x80;
    if (r >= 56) { sha1_block(h, blk); memset(blk, 0, sizeof blk); }
    uint64_t bits = (uint64_t)n * 8;
    for (int j = 0; j < 8; j++) blk[63 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, blk);
    for (int j = 0; j < 5; j++) {
        out[4 * j] = (uint8_t)(h[j] >> 24); out[4 * j + 1] = (uint8_t)(h[j] >> 16);
        out[4 * j + 2] = (uint8_t)(h[j] >> 8); out[4 * j + 3] = (uint8_t)h[j];
    }
}
#endif

static void ws_accept(const char *key, size_t klen, char out[29]) {
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char buf[128], d[20];
    if (klen > sizeof buf - sizeof guid) klen = sizeof buf - sizeof guid;
    memcpy(buf, key, klen);
    memcpy(buf + klen, guid, sizeof guid - 1);
    SHA1(buf, klen + sizeof guid - 1, d);
    int o = 0;
    for (int i = 0; i < 20; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (i + 1 < 20 ? (uint32_t)d[i + 1] << 8 : 0) | (i + 2 < 20 ? d[i + 2] : 0);
        out[o++] = b64[(v >> 18) & 63];
        out[o++] = b64[(v >> 12) & 63];
        out[o++] = i + 1 < 20 ? b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < 20 ? b64[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- symbol table ------------------------------------------------------ */

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* Index of symbol s (create: make it if absent); -1 if absent or too long. */
static int sym_find(const char *s, size_t n, int create) {
    if (n == 0 || n >= SYM_LEN) return -1;
    uint32_t i = hash(s, n) & (TABLE_SLOTS - 1);
    for (;;) {
        symbol_t *e = &table[i];
        if (!e->name[0]) {
            if (!create) return -1;
            memcpy(e->name, s, n);
            e->name[n] = 0;
            return (int)i;
        }
        if (strlen(e->name) == n && memcmp(e->name, s, n) == 0) return (int)i;
        i = (i + 1) & (TABLE_SLOTS - 1);
    }
}

static void sym_add(int si, int fd) {
    symbol_t *e = &table[si];
    if (e->nsubs == e->cap) {
        e->cap = e->cap ? e->cap * 2 : 16;
        e->subs = xrealloc(e->subs, (size_t)e->cap * sizeof *e->subs);
    }
    e->subs[e->nsubs++] = fd;
}

static void sym_remove(int si, int fd) {
    symbol_t *e = &table[si];
    for (int i = 0; i < e->nsubs; i++)
        if (e->subs[i] == fd) { e->subs[i] = e->subs[--e->nsubs]; return; }
}

/* ---- client output ----------------------------------------------------- */

static void out_append(client_t *c, const char *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        if (c->out_off) {                      /* reclaim what was sent already */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 4096;
            while (cap < c->out_len + n) cap *= 2;
            c->out = xrealloc(c->out, cap);
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void close_client(client_t *c);

/* One send() of everything pending; the rest waits for EPOLLOUT.  Returns -1
 * when the client is gone (closed here). */
static int flush_client(client_t *c) {
    if (c->out_off == c->out_len) return 0;
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    st_sends++;
    if (w < 0) {
        if (errno == EAGAIN || errno == EINTR) { w = 0; st_send_eagain++; }
        else { close_client(c); return -1; }
    }
    c->out_off += (size_t)w;
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        if (c->out_cap > (1 << 20)) { free(c->out); c->out = NULL; c->out_cap = 0; }
        if (c->want_out) {
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->fd};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            c->want_out = 0;
        }
        if (c->state == C_CLOSING) { close_client(c); return -1; }
    } else if (!c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = c->fd};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 1;
    }
    return 0;
}

static size_t ws_header(uint8_t *h, size_t n, uint8_t opcode) {
    h[0] = 0x80 | opcode;
    if (n < 126) { h[1] = (uint8_t)n; return 2; }
    if (n < 65536) { h[1] = 126; h[2] = (uint8_t)(n >> 8); h[3] = (uint8_t)n; return 4; }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)(n >> (56 - 8 * i));
    return 10;
}

/* A reply or control frame, sent at once (not part of a fan-out batch). */
static void send_frame(client_t *c, uint8_t opcode, const char *p, size_t n) {
    uint8_t h[10];
    size_t hl = ws_header(h, n, opcode);
    out_append(c, (const char *)h, hl);
    out_append(c, p, n);
    if (!c->want_out) flush_client(c);
}

static void send_json(client_t *c, const char *json) { send_frame(c, 1, json, strlen(json)); }

/* ---- client input ------------------------------------------------------ */

static void close_client(client_t *c) {
    for (int i = 0; i < c->nsym; i++) sym_remove(c->sym[i], c->fd);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    clients[c->fd] = NULL;
    if (c->touched) {                          /* never flushed now: drop from the list */
        for (int i = 0; i < ntouched; i++)
            if (touched[i] == c->fd) { touched[i] = -1; break; }
    }
    free(c->in);
    free(c->out);
    free(c);
}

/* Symbols of a {"action":...,"symbols":["a","B"]} message, upper-cased. */
static int parse_symbols(const char *p, size_t n, char out[][SYM_LEN], int max) {
    const char *k = memmem(p, n, "\"symbols\"", 9), *end = p + n;
    int cnt = 0;
    if (!k) return 0;
    k = memchr(k, '[', (size_t)(end - k));
    if (!k) return 0;
    while (k < end && *k != ']') {
        const char *q = memchr(k, '"', (size_t)(end - k));
        if (!q) break;
        const char *e = memchr(q + 1, '"', (size_t)(end - q - 1));
        if (!e) break;
        const char *close = memchr(k, ']', (size_t)(end - k));
        if (close && close < q) break;
        size_t len = (size_t)(e - q - 1);
        if (len > 0 && len < SYM_LEN && cnt < max) {
            for (size_t i = 0; i < len; i++) out[cnt][i] = (char)toupper((unsigned char)q[1 + i]);
            out[cnt][len] = 0;
            cnt++;
        }
        k = e + 1;
    }
    return cnt;
}

static void reply_subscriptions(client_t *c, const char *verb, int n) {
    char msg[1024];
    int o = snprintf(msg, sizeof msg, "{\"type\":\"success\",\"message\":\"Successfully %s %d symbol(s)\","
                                      "\"data\":{\"currentSubscriptions\":[", verb, n);
    for (int i = 0; i < c->nsym; i++)
        o += snprintf(msg + o, sizeof msg - (size_t)o, "%s\"%s\"", i ? "," : "", table[c->sym[i]].name);
    snprintf(msg + o, sizeof msg - (size_t)o, "]},\"timestamp\":%lld}", (long long)now_ms());
    send_json(c, msg);
}

static void on_text(client_t *c, const char *p, size_t n) {
    char syms[MAX_SYMS * 2][SYM_LEN];
    char msg[256];
    if (memmem(p, n, "\"unsubscribe\"", 13)) {
        int k = parse_symbols(p, n, syms, MAX_SYMS * 2), removed = 0;
        for (int i = 0; i < k; i++) {
            int si = sym_find(syms[i], strlen(syms[i]), 0);
            for (int j = 0; j < c->nsym; j++) {
                if (c->sym[j] == si) {
                    sym_remove(si, c->fd);
                    c->sym[j] = c->sym[--c->nsym];
                    removed++;
                    break;
                }
            }
        }
        reply_subscriptions(c, "unsubscribed from", removed);
    } else if (memmem(p, n, "\"subscribe\"", 11)) {
        int k = parse_symbols(p, n, syms, MAX_SYMS * 2), added = 0, fresh[MAX_SYMS * 2];
        for (int i = 0; i < k; i++) {           /* the new ones, duplicates dropped */
            int si = sym_find(syms[i], strlen(syms[i]), 1), dup = 0;
            for (int j = 0; j < c->nsym; j++) dup |= c->sym[j] == si;
            for (int j = 0; j < added; j++) dup |= fresh[j] == si;
            if (si >= 0 && !dup) fresh[added++] = si;
        }
        if (c->nsym + added > MAX_SYMS) {
            snprintf(msg, sizeof msg, "{\"type\":\"error\",\"message\":\"Subscription would exceed maximum of %d "
                                      "symbols\",\"timestamp\":%lld}", MAX_SYMS, (long long)now_ms());
            send_json(c, msg);
            return;
        }
        for (int j = 0; j < added; j++) {
            c->sym[c->nsym++] = fresh[j];
            sym_add(fresh[j], c->fd);
        }
        reply_subscriptions(c, "subscribed to", added);
    } else if (memmem(p, n, "\"ping\"", 6)) {
        snprintf(msg, sizeof msg, "{\"type\":\"pong\",\"timestamp\":%lld}", (long long)now_ms());
        send_json(c, msg);
    } else {
        snprintf(msg, sizeof msg, "{\"type\":\"error\",\"message\":\"Unknown action\",\"timestamp\":%lld}",
                 (long long)now_ms());
        send_json(c, msg);
    }
}

/* Client frames: masked, unfragmented (all a bench client sends). */
static int feed_ws(client_t *c) {
    int fd = c->fd;                            /* c may be freed by a failed reply */
    size_t off = 0;
    while (c->in_len - off >= 2) {
        uint8_t *h = (uint8_t *)c->in + off;
        uint8_t opcode = h[0] & 0x0f;
        size_t hl = 2, len = h[1] & 0x7f;
        if (len == 126) hl += 2;
        else if (len == 127) hl += 8;
        int masked = h[1] & 0x80;
        if (masked) hl += 4;
        if (c->in_len - off < hl) break;
        if (len == 126) len = (size_t)h[2] << 8 | h[3];
        else if (len == 127) { len = 0; for (int i = 2; i < 10; i++) len = len << 8 | h[i]; }
        if (len > IN_MAX) { close_client(c); return -1; }
        if (c->in_len - off < hl + len) break;
        char *p = (char *)h + hl;
        if (masked)
            for (size_t i = 0; i < len; i++) p[i] ^= (char)h[hl - 4 + (i & 3)];
        off += hl + len;
        if (opcode == 1) on_text(c, p, len);
        else if (opcode == 9) send_frame(c, 10, p, len);
        else if (opcode == 8) {
            send_frame(c, 8, p, len < 2 ? len : 2);   /* echo the status code */
            if (!clients[fd]) return -1;
            c->state = C_CLOSING;
            if (!c->want_out) { close_client(c); return -1; }
            break;
        }
        if (!clients[fd]) return -1;           /* closed while replying */
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= (uint32_t)off;
    return 0;
}

static const char *header_value(const char *req, const char *name, size_t *len) {
    const char *h = strcasestr(req, name);
    if (!h) return NULL;
    h += strlen(name);
    while (*h == ' ') h++;
    const char *e = strstr(h, "\r\n");
    if (!e) return NULL;
    while (e > h && e[-1] == ' ') e--;
    *len = (size_t)(e - h);
    return h;
}

static int feed_http(client_t *c) {
    c->in[c->in_len] = 0;
    char *eoh = strstr(c->in, "\r\n\r\n");
    if (!eoh) {
        if (c->in_len >= HTTP_MAX - 1) { close_client(c); return -1; }
        return 0;
    }
    size_t klen;
    const char *key = header_value(c->in, "\r\nSec-WebSocket-Key:", &klen);
    if (!key || !strcasestr(c->in, "\r\nUpgrade: websocket")) {
        static const char nf[] = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        out_append(c, nf, sizeof nf - 1);
        c->state = C_CLOSING;
        flush_client(c);
        return -1;
    }
    char acc[29], resp[256], welcome[512];
    ws_accept(key, klen, acc);
    int n = snprintf(resp, sizeof resp, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                        "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
    out_append(c, resp, (size_t)n);
    c->state = C_WS;
    size_t used = (size_t)(eoh + 4 - c->in);
    memmove(c->in, c->in + used, c->in_len - used);
    c->in_len -= (uint32_t)used;
    snprintf(welcome, sizeof welcome,
             "{\"type\":\"success\",\"message\":\"Connected to WebSocket Gateway\",\"data\":"
             "{\"connectionId\":\"floor-%llu\",\"serverId\":\"floor-gateway\",\"maxSymbolsPerConnection\":%d},"
             "\"timestamp\":%lld}", (unsigned long long)++conn_seq, MAX_SYMS, (long long)now_ms());
    int fd = c->fd;
    send_json(c, welcome);                     /* one send: 101 and welcome together */
    if (!clients[fd]) return -1;
    return feed_ws(c);
}

static void on_client(client_t *c, uint32_t ev) {
    if (ev & EPOLLOUT) {
        if (flush_client(c) < 0) return;
    }
    if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    size_t cap = (c->state == C_HTTP ? HTTP_MAX - 1 : IN_MAX * 2) - c->in_len;
    ssize_t r = recv(c->fd, c->in + c->in_len, cap, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        close_client(c);
        return;
    }
    c->in_len += (uint32_t)r;
    if (c->state == C_HTTP) feed_http(c);
    else if (c->state == C_WS) feed_ws(c);
    else c->in_len = 0;                        /* closing: ignore the rest */
}

static void on_accept(void) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
            if (errno == EMFILE || errno == ENFILE) { fprintf(stderr, "floor_gateway: out of fds\n"); return; }
            die("accept4");
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fd >= nclients_cap) {
            int cap = nclients_cap;
            while (cap <= fd) cap *= 2;
            clients = xrealloc(clients, (size_t)cap * sizeof *clients);
            memset(clients + nclients_cap, 0, (size_t)(cap - nclients_cap) * sizeof *clients);
            nclients_cap = cap;
        }
        client_t *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->in = malloc(IN_MAX * 2 + 1);
        if (!c->in) die("malloc");
        clients[fd] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
        st_accepted++;
    }
}

/* ---- Redis: RESP in, fan-out ------------------------------------------- */

/* A RESP line "<c><int>\r\n" at p; returns the position after it, NULL if
 * incomplete. */
static const char *resp_int(const char *p, const char *end, long long *v) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl) return NULL;
    *v = strtoll(p + 1, NULL, 10);
    return nl + 1;
}

/* One trade: frame it once, append it to every subscriber. */
static void fan_out(const char *chan, size_t chan_len, const char *payload, size_t plen, int64_t ms) {
    size_t pl = strlen(opt_prefix);
    if (chan_len <= pl || memcmp(chan, opt_prefix, pl) != 0) return;
    int si = sym_find(chan + pl, chan_len - pl, 0);
    if (si < 0 || table[si].nsubs == 0) { st_unrouted++; return; }
    if (plen < 2 || payload[0] != '{' || payload[plen - 1] != '}') return;   /* not a JSON object */
    char tail[40];
    int tl = snprintf(tail, sizeof tail, ",\"timestamp\":%lld}", (long long)ms);
    size_t body = 23 + plen + (size_t)tl;       /* {"type":"trade","data": */
    if (scratch_cap < body + 10) {
        scratch_cap = (body + 10) * 2;
        scratch = xrealloc(scratch, scratch_cap);
    }
    size_t hl = ws_header((uint8_t *)scratch, body, 1);
    memcpy(scratch + hl, "{\"type\":\"trade\",\"data\":", 23);
    memcpy(scratch + hl + 23, payload, plen);
    memcpy(scratch + hl + 23 + plen, tail, (size_t)tl);
    size_t flen = hl + body;
    symbol_t *e = &table[si];
    for (int i = 0; i < e->nsubs; i++) {
        client_t *c = clients[e->subs[i]];
        if (c->state != C_WS) continue;
        out_append(c, scratch, flen);
        if (!c->touched) {
            c->touched = 1;
            if (ntouched == touched_cap) {
                touched_cap = touched_cap ? touched_cap * 2 : 1024;
                touched = xrealloc(touched, (size_t)touched_cap * sizeof *touched);
            }
            touched[ntouched++] = c->fd;
        }
        st_frames++;
        st_frame_bytes += flen;
    }
}

/* Parse every complete reply in rbuf; returns the bytes consumed. */
static size_t parse_redis(int64_t ms) {
    const char *p = rbuf, *end = rbuf + rlen;
    while (p < end) {
        const char *start = p;
        long long n;
        if (*p != '*') {                       /* e.g. an error reply: skip the line */
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            if (!nl) break;
            fprintf(stderr, "floor_gateway: redis: %.*s\n", (int)(nl - p), p);
            p = nl + 1;
            continue;
        }
        if (!(p = resp_int(p, end, &n))) { p = start; break; }
        const char *item[4];
        size_t ilen[4];
        int k = 0, ok = 1;
        for (long long i = 0; i < n; i++) {
            if (p >= end) { ok = 0; break; }
            char t = *p;
            long long v;
            const char *q = resp_int(p, end, &v);
            if (!q) { ok = 0; break; }
            if (t == '$') {
                if (v < 0) { p = q; continue; }
                if ((size_t)(end - q) < (size_t)v + 2) { ok = 0; break; }
                if (k < 4) { item[k] = q; ilen[k] = (size_t)v; k++; }
                p = q + v + 2;
            } else {
                p = q;                         /* :N of a psubscribe confirmation */
            }
        }
        if (!ok) { p = start; break; }
        if (k == 4 && ilen[0] == 8 && memcmp(item[0], "pmessage", 8) == 0) {
            st_redis_messages++;
            fan_out(item[2], ilen[2], item[3], ilen[3], ms);
        }
    }
    return (size_t)(p - rbuf);
}

static void flush_touched(void) {
    if (!ntouched) return;
    st_flushes++;
    for (int i = 0; i < ntouched; i++) {
        if (touched[i] < 0) continue;
        client_t *c = clients[touched[i]];
        c->touched = 0;
        if (!c->want_out) flush_client(c);     /* one send per client per Redis read */
    }
    ntouched = 0;
}

static void on_redis(void) {
    for (;;) {
        if (rlen == REDIS_BUF) { fprintf(stderr, "floor_gateway: a Redis reply over 1 MiB\n"); exit(2); }
        ssize_t r = recv(rfd, rbuf + rlen, REDIS_BUF - rlen, 0);
        if (r == 0) { fprintf(stderr, "floor_gateway: Redis closed the connection\n"); exit(2); }
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            die("recv redis");
        }
        st_redis_reads++;
        st_redis_bytes += (uint64_t)r;
        rlen += (size_t)r;
        size_t used = parse_redis(now_ms());
        memmove(rbuf, rbuf + used, rlen - used);
        rlen -= used;
        flush_touched();
        if ((size_t)r < REDIS_BUF / 2) return;   /* drained for now: back to epoll */
    }
}

/* ---- main -------------------------------------------------------------- */

static void print_stats(const char *tag) {
    int n = 0;
    for (int i = 0; i < nclients_cap; i++) n += clients[i] != NULL;
    printf("%s {\"frames\":%llu,\"frame_bytes\":%llu,\"sends\":%llu,\"send_eagain\":%llu,"
           "\"flushes\":%llu,\"redis_reads\":%llu,\"redis_bytes\":%llu,\"redis_messages\":%llu,"
           "\"unrouted\":%llu,\"accepted\":%llu,\"clients\":%d}\n",
           tag, (unsigned long long)st_frames, (unsigned long long)st_frame_bytes,
           (unsigned long long)st_sends, (unsigned long long)st_send_eagain,
           (unsigned long long)st_flushes, (unsigned long long)st_redis_reads,
           (unsigned long long)st_redis_bytes, (unsigned long long)st_redis_messages,
           (unsigned long long)st_unrouted, (unsigned long long)st_accepted, n);
    fflush(stdout);
}

static void on_usr1(int s) { (void)s; want_stats = 1; }
static void on_term(int s) { (void)s; want_stop = 1; }

int main(int argc, char **argv) {
    int o;
    while ((o = getopt(argc, argv, "H:p:R:r:P:")) != -1) {
        switch (o) {
        case 'H': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 'R': opt_redis_host = optarg; break;
        case 'r': opt_redis_port = atoi(optarg); break;
        case 'P': opt_prefix = optarg; break;
        default:
            fprintf(stderr, "usage: floor_gateway -p PORT -r REDIS_PORT [-H host] [-R redis_host] [-P prefix]\n");
            return 2;
        }
    }
    if (!opt_port || !opt_redis_port) {
        fprintf(stderr, "floor_gateway: -p PORT and -r REDIS_PORT are required\n");
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_usr1};
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    table = calloc(TABLE_SLOTS, sizeof *table);
    nclients_cap = 1024;
    clients = calloc((size_t)nclients_cap, sizeof *clients);
    rbuf = malloc(REDIS_BUF);
    if (!table || !clients || !rbuf) die("malloc");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    /* Redis first: subscribed before the port accepts, as the harness expects. */
    rfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_redis_port)};
    if (inet_pton(AF_INET, opt_redis_host, &a.sin_addr) != 1) { fprintf(stderr, "bad redis host\n"); return 2; }
    if (connect(rfd, (struct sockaddr *)&a, sizeof a) < 0) die("connect redis");
    char cmd[256];
    size_t pl = strlen(opt_prefix);
    int cl = snprintf(cmd, sizeof cmd, "*2\r\n$10\r\nPSUBSCRIBE\r\n$%zu\r\n%s*\r\n", pl + 1, opt_prefix);
    if (send(rfd, cmd, (size_t)cl, MSG_NOSIGNAL) != cl) die("send PSUBSCRIBE");
    fcntl(rfd, F_SETFL, fcntl(rfd, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = rfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, rfd, &ev) < 0) die("epoll_ctl redis");

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_port)};
    if (inet_pton(AF_INET, opt_host, &la.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
    if (bind(lfd, (struct sockaddr *)&la, sizeof la) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    ev.data.fd = lfd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl listen");

    struct epoll_event evs[512];
    while (!want_stop) {
        if (want_stats) { want_stats = 0; print_stats("STATS"); }
        int n = epoll_wait(epfd, evs, 512, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == rfd) on_redis();
            else if (fd == lfd) on_accept();
            else if (fd < nclients_cap && clients[fd]) on_client(clients[fd], evs[i].events);
        }
    }
    print_stats("STATS");
    return 0;
}

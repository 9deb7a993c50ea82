/*
 * publisher: writes trade PUBLISH commands to Redis over a raw RESP socket.
 *
 * Why C and raw RESP: the latency scenario offers up to ~20k publishes/s on a
 * strict 1 ms schedule on a core shared with Redis and the load client, and the
 * saturation scenario wants Redis, not the publisher, to set the pace.
 *
 * Message k goes to symbol k mod S (S = lines in the symbol file), so every
 * symbol gets a known count and the orchestrator can compute the exact number
 * of deliveries each client must see.  Each payload is a JSON object of
 * 150-200 bytes with the seed's trade fields plus "seq" (per-symbol counter from
 * 1) and "ts" (CLOCK_REALTIME ns when the command was built, just before write).
 *
 * With -E EPOCH the payload is in the form the publish_trade Redis Function
 * puts on the channel (gateway/protocol.py published_form):
 * {"_seq":<seq>,"_epoch":"EPOCH",<the trade's fields>}, with <seq> the same
 * per-symbol counter as the trade's own "seq" (contiguous from 1).  It is still
 * a plain PUBLISH: the gateway frames it as a sequenced trade, and the Redis
 * Function's cost (bench/fcall_cost.py) stays out of the measurement.
 *
 * Modes:
 *   -m sat  -n TOTAL [-w WINDOW]   pipelined, at most WINDOW replies outstanding
 *   -m rate -r MSGS_PER_S -d SECONDS   open loop: each 1 ms tick publishes its
 *                                  share (rate/1000, fractions carried), late
 *                                  ticks catch up (the schedule is absolute)
 *   -m rate ... -L N               open loop in pipelines of N: every write
 *                                  carries N trades, the writes evenly spaced
 *                                  N/rate s apart on an absolute schedule
 *                                  (late ones still go one write each); the
 *                                  total is the same as without -L.  N sets
 *                                  how many trades one Redis read can carry
 *                                  to a subscriber that keeps up: 1, 10, 100
 * Prints one JSON report on stdout.
 * Build: gcc -O2 -o publisher publisher.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *opt_host = "127.0.0.1";
static int opt_port = 0;
static const char *opt_syms = NULL;
static const char *opt_mode = "sat";
static const char *opt_prefix = "channel:trade:";
static long long opt_total = 0;
static double opt_rate = 0, opt_duration = 0;
static int opt_window = 4096;
static int opt_batch = 256;
static int opt_pipeline = 0;           /* -L: trades per write in rate mode (0: 1 ms ticks) */
static const char *opt_epoch = NULL;   /* -E: sequenced (published) form */

static char **syms;
static int nsyms;
static int64_t *seqs;
static int fd;
static uint64_t sent, replies, recv_min = UINT64_MAX, recv_max, recv_zero, errors;
static uint64_t payload_bytes;

static char rbuf[65536];
static size_t rlen;

static int64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "publisher: %s: %s\n", msg, strerror(errno));
    exit(2);
}

/* Replies to PUBLISH are integers (":N\r\n", N = receivers); anything else is
 * an error reply and is counted. */
static void parse_replies(void) {
    size_t i = 0;
    while (i < rlen) {
        char *nl = memchr(rbuf + i, '\n', rlen - i);
        if (!nl) break;
        if (rbuf[i] == ':') {
            uint64_t v = strtoull(rbuf + i + 1, NULL, 10);
            if (v < recv_min) recv_min = v;
            if (v > recv_max) recv_max = v;
            if (v == 0) recv_zero++;
        } else {
            errors++;
            if (errors <= 3) fprintf(stderr, "publisher: reply %.*s\n", (int)(nl - rbuf - i), rbuf + i);
        }
        replies++;
        i = (size_t)(nl - rbuf) + 1;
    }
    memmove(rbuf, rbuf + i, rlen - i);
    rlen -= i;
}

static void read_replies(int block_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, block_ms) <= 0) return;
    ssize_t r = recv(fd, rbuf + rlen, sizeof rbuf - rlen, MSG_DONTWAIT);
    if (r == 0) { fprintf(stderr, "publisher: redis closed the connection\n"); exit(2); }
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        die("recv");
    }
    rlen += (size_t)r;
    parse_replies();
}

static void write_all(const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { read_replies(1); continue; }
            die("send");
        }
        p += w;
        n -= (size_t)w;
    }
}

static const char *exchanges[] = {"NASDAQ", "NYSE", "ARCA", "BATS", "IEX", "EDGX"};
static const char *conds[] = {"[\"@\",\"T\"]", "[\"@\",\"F\",\"I\"]", "[\"@\"]", "[\"@\",\"12\",\"T\"]"};

/* Append one PUBLISH for message number k to out; returns bytes written. */
static size_t build(char *out, uint64_t k) {
    int s = (int)(k % (uint64_t)nsyms);
    int64_t seq = ++seqs[s];
    char payload[480];
    int64_t ts = now_ns(CLOCK_REALTIME);
    /* Prices and volumes vary so payload sizes vary a little, like real trades. */
    unsigned h = (unsigned)(k * 2654435761u);
    int hl = opt_epoch ? snprintf(payload, 80, "{\"_seq\":%lld,\"_epoch\":\"%s\",", (long long)seq, opt_epoch)
                       : snprintf(payload, 80, "{");
    int pl = hl + snprintf(payload + hl, sizeof payload - (size_t)hl,
                      "\"symbol\":\"%s\",\"price\":%u.%02u,\"volume\":%u,\"timestamp\":%lld,"
                      "\"conditions\":%s,\"exchange\":\"%s\",\"tradeId\":\"%016llx\","
                      "\"seq\":%lld,\"ts\":%lld}",
                      syms[s], 10 + h % 990, (h >> 10) % 100, 1 + (h >> 17) % 5000,
                      (long long)(ts / 1000000), conds[(h >> 5) & 3], exchanges[(h >> 8) % 6],
                      (unsigned long long)k * 0x9e3779b97f4a7c15ull, (long long)seq, (long long)ts);
    payload_bytes += (uint64_t)pl;
    size_t chl = strlen(opt_prefix) + strlen(syms[s]);
    int n = sprintf(out, "*3\r\n$7\r\nPUBLISH\r\n$%zu\r\n%s%s\r\n$%d\r\n", chl, opt_prefix, syms[s], pl);
    memcpy(out + n, payload, (size_t)pl);
    memcpy(out + n + pl, "\r\n", 2);
    return (size_t)n + (size_t)pl + 2;
}

static void load_syms(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die("open symbol file");
    char line[256];
    int cap = 256;
    syms = malloc((size_t)cap * sizeof *syms);
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, " \t\r\n")] = 0;
        if (!line[0]) continue;
        if (nsyms == cap) syms = realloc(syms, (size_t)(cap *= 2) * sizeof *syms);
        syms[nsyms++] = strdup(line);
    }
    fclose(f);
    seqs = calloc((size_t)nsyms, sizeof *seqs);
}

int main(int argc, char **argv) {
    int o;
    while ((o = getopt(argc, argv, "H:p:s:m:n:r:d:w:b:P:E:L:")) != -1) {
        switch (o) {
        case 'H': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 's': opt_syms = optarg; break;
        case 'm': opt_mode = optarg; break;
        case 'n': opt_total = atoll(optarg); break;
        case 'r': opt_rate = atof(optarg); break;
        case 'd': opt_duration = atof(optarg); break;
        case 'w': opt_window = atoi(optarg); break;
        case 'b': opt_batch = atoi(optarg); break;
        case 'P': opt_prefix = optarg; break;
        case 'E': opt_epoch = optarg; break;
        case 'L': opt_pipeline = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: publisher -p PORT -s SYMFILE (-m sat -n TOTAL [-w WINDOW] | "
                            "-m rate -r RATE -d SECONDS [-L pipeline]) [-P prefix] [-E epoch]\n");
            return 2;
        }
    }
    int rate_mode = strcmp(opt_mode, "rate") == 0;
    if (!opt_port || !opt_syms || (rate_mode ? (opt_rate <= 0 || opt_duration <= 0) : opt_total <= 0)) {
        fprintf(stderr, "publisher: missing arguments\n");
        return 2;
    }
    if (opt_pipeline < 0 || opt_pipeline > 1000) {
        fprintf(stderr, "publisher: -L: 1-1000 trades per write\n");
        return 2;
    }
    if (opt_epoch && (!opt_epoch[0] || strlen(opt_epoch) > 32 ||
                      strspn(opt_epoch, "0123456789abcdefghijklmnopqrstuvwxyz"
                                        "ABCDEFGHIJKLMNOPQRSTUVWXYZ_-") != strlen(opt_epoch))) {
        fprintf(stderr, "publisher: -E: 1-32 characters of A-Z a-z 0-9 _ -\n");
        return 2;
    }
    load_syms(opt_syms);
    if (!nsyms) { fprintf(stderr, "publisher: no symbols\n"); return 2; }

    fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_port)};
    inet_pton(AF_INET, opt_host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    char *out = malloc((size_t)(opt_batch > 1024 ? opt_batch : 1024) * 600);
    int64_t late_ticks = 0, max_lag = 0, ticks = 0;
    int64_t t0 = now_ns(CLOCK_MONOTONIC);

    if (!rate_mode) {
        uint64_t total = (uint64_t)opt_total;
        while (replies < total) {
            uint64_t outstanding = sent - replies;
            if (sent < total && outstanding < (uint64_t)opt_window) {
                uint64_t room = (uint64_t)opt_window - outstanding, left = total - sent;
                uint64_t n = room < left ? room : left;
                if (n > (uint64_t)opt_batch) n = (uint64_t)opt_batch;
                size_t len = 0;
                for (uint64_t i = 0; i < n; i++) len += build(out + len, sent + i);
                write_all(out, len);
                sent += n;
                read_replies(0);
            } else {
                read_replies(1000);
            }
        }
    } else if (opt_pipeline > 0) {
        /* Open loop in pipelines of N: the same total as the 1 ms grid below,
         * write k (N trades, fewer for the last) due at start + k*N/rate s.
         * Sub-millisecond sleeps need a small timer slack (default 50 us). */
        prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
        int64_t nticks = (int64_t)(opt_duration * 1000.0 + 0.5);
        uint64_t total = (uint64_t)(opt_rate * (double)nticks / 1000.0);
        uint64_t per = (uint64_t)opt_pipeline;
        double interval_ns = (double)per * 1e9 / opt_rate;
        int64_t start = now_ns(CLOCK_MONOTONIC) + 1000000, last_read = 0;
        for (uint64_t k = 0; sent < total; k++) {
            int64_t due_at = start + (int64_t)((double)k * interval_ns);
            struct timespec d = {.tv_sec = due_at / 1000000000LL, .tv_nsec = due_at % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL) == EINTR) {}
            int64_t now = now_ns(CLOCK_MONOTONIC), lag = now - due_at;
            if (lag > max_lag) max_lag = lag;
            if (lag > 1000000) late_ticks++;
            uint64_t n = total - sent < per ? total - sent : per;
            size_t len = 0;
            for (uint64_t i = 0; i < n; i++) len += build(out + len, sent++);
            write_all(out, len);
            ticks++;
            /* Replies are a few bytes each: read them about once a millisecond,
             * not once a write (a syscall per write would double ours). */
            if (now - last_read >= 1000000) { read_replies(0); last_read = now; }
        }
        int64_t until = now_ns(CLOCK_MONOTONIC) + 10 * 1000000000LL;
        while (replies < sent && now_ns(CLOCK_MONOTONIC) < until) read_replies(100);
    } else {
        /* Open loop on an absolute 1 ms grid: tick t is due at start + t ms and
         * publishes floor(rate*(t+1)/1000) - floor(rate*t/1000) messages. */
        int64_t nticks = (int64_t)(opt_duration * 1000.0 + 0.5);
        int64_t start = now_ns(CLOCK_MONOTONIC) + 1000000;
        for (int64_t t = 0; t < nticks; t++) {
            int64_t due_at = start + t * 1000000;
            struct timespec d = {.tv_sec = due_at / 1000000000LL, .tv_nsec = due_at % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL) == EINTR) {}
            int64_t lag = now_ns(CLOCK_MONOTONIC) - due_at;
            if (lag > max_lag) max_lag = lag;
            if (lag > 1000000) late_ticks++;
            uint64_t n = (uint64_t)(opt_rate * (double)(t + 1) / 1000.0) -
                         (uint64_t)(opt_rate * (double)t / 1000.0);
            size_t len = 0;
            for (uint64_t i = 0; i < n; i++) {
                len += build(out + len, sent);
                sent++;
                if (len > (size_t)1000 * 500) { write_all(out, len); len = 0; }
            }
            if (len) write_all(out, len);
            read_replies(0);
            ticks++;
        }
        int64_t until = now_ns(CLOCK_MONOTONIC) + 10 * 1000000000LL;
        while (replies < sent && now_ns(CLOCK_MONOTONIC) < until) read_replies(100);
    }
    double elapsed = (double)(now_ns(CLOCK_MONOTONIC) - t0) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"mode\":\"%s\",\"sent\":%llu,\"replies\":%llu,\"errors\":%llu,"
           "\"receivers_min\":%llu,\"receivers_max\":%llu,\"receivers_zero\":%llu,"
           "\"elapsed_s\":%.4f,\"rate\":%.1f,\"payload_bytes_avg\":%.1f,"
           "\"ticks\":%lld,\"late_ticks\":%lld,\"max_tick_lag_us\":%.1f,"
           "\"cpu_user_s\":%.4f,\"cpu_sys_s\":%.4f,\"pipeline\":%d}\n",
           rate_mode ? "rate" : "sat", (unsigned long long)sent, (unsigned long long)replies,
           (unsigned long long)errors, (unsigned long long)(recv_min == UINT64_MAX ? 0 : recv_min),
           (unsigned long long)recv_max, (unsigned long long)recv_zero, elapsed,
           elapsed > 0 ? (double)sent / elapsed : 0.0,
           sent ? (double)payload_bytes / (double)sent : 0.0, (long long)ticks, (long long)late_ticks,
           (double)max_lag / 1000.0, ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, opt_pipeline);
    close(fd);
    return (errors || replies < sent) ? 1 : 0;
}

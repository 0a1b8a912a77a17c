/*
 * loadgen: a C load generator for the counter protocol, so that benchmarks
 * measure the server and not a Python client. Epoll, one thread.
 *
 *   cc -O2 -o loadgen bench/loadgen.c
 *   ./loadgen HOST PORT CONNECTIONS DEPTH SECONDS
 *
 * Every connection keeps DEPTH frames of increment 1 in flight for SECONDS,
 * then collects what is owed. Each reply is checked (8 bytes, strictly
 * increasing per connection). Prints one JSON object: replies, replies/s,
 * errors, latency percentiles in microseconds (send to reply, per frame),
 * last value seen. The frame for increment 1 is a constant (its XXH64 of "1"
 * is in docs/protocol-vectors.json), so no hashing is needed here.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const unsigned char FRAME_ONE[16] = {0, 0, 0, 0, 0, 0, 0, 1,
                                            0xb7, 0xb4, 0x12, 0x76, 0x36, 0x05, 0x64, 0xd4};
#define MAX_DEPTH 1024
#define BUCKETS 20000 /* latency histogram: 10 us buckets up to 200 ms */

typedef struct {
    int fd;
    int owed;
    uint64_t last;
    unsigned char partial[8];
    int partial_len;
    double sent_at[MAX_DEPTH]; /* ring of send times, oldest first */
    int head, count;
    int done;
} conn_t;

static uint64_t histogram[BUCKETS];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void record(double seconds) {
    long bucket = (long)(seconds * 1e5);
    if (bucket >= BUCKETS) bucket = BUCKETS - 1;
    histogram[bucket]++;
}

static long percentile(uint64_t total, double p) {
    uint64_t want = (uint64_t)(total * p / 100.0), seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += histogram[i];
        if (seen > want || (seen == total && seen)) return (long)i * 10 + 5;
    }
    return 0;
}

static int send_frames(conn_t *c, int n) {
    static unsigned char buffer[16 * MAX_DEPTH];
    for (int i = 0; i < n; i++) memcpy(buffer + 16 * i, FRAME_ONE, 16);
    ssize_t off = 0, len = 16 * n;
    while (off < len) {
        ssize_t w = send(c->fd, buffer + off, len - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) continue; /* rare: spin briefly */
            return -1;
        }
        off += w;
    }
    double t = now();
    for (int i = 0; i < n; i++) {
        c->sent_at[(c->head + c->count) % MAX_DEPTH] = t;
        c->count++;
    }
    c->owed += n;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS DEPTH SECONDS\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]), depth = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (nconn < 1 || depth < 1 || depth > MAX_DEPTH || seconds <= 0) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    conn_t *conns = calloc(nconn, sizeof(conn_t));
    int ep = epoll_create1(0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fprintf(stderr, "loadgen: connect %d: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    uint64_t replies = 0, errors = 0, last_seen = 0;
    double start = now(), deadline = start + seconds;
    for (int i = 0; i < nconn; i++)
        if (send_frames(&conns[i], depth) < 0) errors++;
    int active = nconn;
    struct epoll_event events[256];
    unsigned char buf[65536];
    while (active > 0) {
        int n = epoll_wait(ep, events, 256, 1000);
        double t = now();
        if (n == 0 && t > deadline + 10) break; /* replies owed never came */
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                errors += c->owed ? c->owed : 1;
                c->done = 1, c->owed = 0, active--;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                continue;
            }
            int got = 0;
            ssize_t pos = 0;
            while (pos < r) {
                int take = 8 - c->partial_len;
                if (take > r - pos) take = (int)(r - pos);
                memcpy(c->partial + c->partial_len, buf + pos, take);
                c->partial_len += take, pos += take;
                if (c->partial_len < 8) break;
                uint64_t v = 0;
                for (int k = 0; k < 8; k++) v = (v << 8) | c->partial[k];
                c->partial_len = 0;
                if (v <= c->last) errors++;
                c->last = v;
                if (v > last_seen) last_seen = v;
                record(t - c->sent_at[c->head]);
                c->head = (c->head + 1) % MAX_DEPTH, c->count--;
                got++;
            }
            replies += got;
            c->owed -= got;
            if (t < deadline) {
                if (got && send_frames(c, got) < 0) errors++;
            } else if (c->owed <= 0 && !c->done) {
                c->done = 1, active--;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"connections\": %d, \"depth\": %d, \"seconds\": %.3f, \"replies\": %llu, "
           "\"replies_per_second\": %.1f, \"errors\": %llu, \"p50_us\": %ld, \"p99_us\": %ld, "
           "\"last_value\": %llu}\n",
           nconn, depth, elapsed, (unsigned long long)replies, replies / elapsed,
           (unsigned long long)errors, percentile(replies, 50), percentile(replies, 99),
           (unsigned long long)last_seen);
    for (int i = 0; i < nconn; i++) close(conns[i].fd);
    return errors ? 1 : 0;
}

/*
 * floor: the physical floor for benchmarks. A minimal C epoll server that
 * speaks the counter protocol (docs/protocol.md): it reads, verifies each
 * frame's XXH64 checksum, applies the increment with the overflow rule and
 * writes every reply of a read in one send. One thread, no pool, no metrics,
 * no timeouts, no shutdown grace: what the kernel and the protocol cost, and
 * nothing else. Not a server to run for real.
 *
 *   cc -O2 -o floor bench/floor.c
 *   ./floor PORT            (listens on 127.0.0.1; SIGTERM stops it)
 *   ./floor --checksum N... (prints each N's checksum, for the harness to check)
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
#include <sys/socket.h>
#include <unistd.h>

/* XXH64, seed 0, for the short inputs of the protocol (at most 20 digits). */
static const uint64_t P1 = 11400714785074694791ULL, P2 = 14029467366897019727ULL,
                      P3 = 1609587929392839161ULL, P4 = 9650029242287828579ULL,
                      P5 = 2870177450012600261ULL;

static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t read64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts (x86_64, aarch64) */
    return v;
}

static uint64_t xxh64_short(const unsigned char *p, size_t len) {
    uint64_t h = P5 + len;
    const unsigned char *end = p + len;
    while (p + 8 <= end) {
        uint64_t k = rotl(read64(p) * P2, 31) * P1;
        h = rotl(h ^ k, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        uint32_t w;
        memcpy(&w, p, 4);
        h = rotl(h ^ ((uint64_t)w * P1), 23) * P2 + P3;
        p += 4;
    }
    while (p < end) h = rotl(h ^ (*p++ * P5), 11) * P1;
    h ^= h >> 33, h *= P2, h ^= h >> 29, h *= P3, h ^= h >> 32;
    return h;
}

static uint64_t checksum_of(uint64_t n) {
    unsigned char digits[20];
    int len = 0;
    do digits[19 - len++] = '0' + n % 10, n /= 10;
    while (n);
    return xxh64_short(digits + 20 - len, len);
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) p[i] = (unsigned char)v, v >>= 8;
}

#define READ_SIZE 16384

typedef struct {
    int fd;
    unsigned char partial[16];
    int partial_len;
} conn_t;

static uint64_t counter;
static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig, stopping = 1; }

static int send_all(int fd, const unsigned char *out, size_t len) {
    while (len) { /* replies of one read are at most 8 KiB: blocking briefly is fine */
        ssize_t w = send(fd, out, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return -1;
        }
        out += w, len -= (size_t)w;
    }
    return 0;
}

/* Read once, answer every complete frame. Returns -1 to close the connection. */
static int serve(conn_t *c) {
    static unsigned char in[16 + READ_SIZE], out[READ_SIZE / 2 + 8];
    memcpy(in, c->partial, c->partial_len);
    ssize_t r = recv(c->fd, in + c->partial_len, READ_SIZE, 0);
    if (r < 0) return errno == EAGAIN ? 0 : -1;
    if (r == 0) return -1;
    size_t have = c->partial_len + (size_t)r, pos = 0, replies = 0;
    int refused = 0;
    for (; pos + 16 <= have; pos += 16) {
        uint64_t n = be64(in + pos);
        if (be64(in + pos + 8) != checksum_of(n) || counter + n < counter) {
            refused = 1;
            break;
        }
        counter += n;
        put_be64(out + 8 * replies++, counter);
    }
    c->partial_len = (int)(have - pos);
    memcpy(c->partial, in + pos, refused ? 0 : c->partial_len);
    if (replies && send_all(c->fd, out, 8 * replies) < 0) return -1;
    return refused ? -1 : 0;
}

/* Print the checksum of each N: the harness compares them with the xxhash package. */
static int print_checksums(int count, char **numbers) {
    for (int i = 0; i < count; i++)
        printf("%016llx\n", (unsigned long long)checksum_of(strtoull(numbers[i], NULL, 10)));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--checksum") == 0) return print_checksums(argc - 2, argv + 2);
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT | --checksum N...\n", argv[0]);
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 4096) < 0) {
        fprintf(stderr, "floor: cannot listen on port %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    fcntl(listener, F_SETFL, O_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(ep, events, 256, 200);
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *fresh = calloc(1, sizeof *fresh);
                    fresh->fd = fd;
                    struct epoll_event add = {.events = EPOLLIN, .data.ptr = fresh};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &add);
                }
                continue;
            }
            if (serve(c) < 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c);
            }
        }
    }
    printf("{\"value\": %llu}\n", (unsigned long long)counter);
    return 0;
}

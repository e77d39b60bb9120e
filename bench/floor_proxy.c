/*
 * The floor for relaying a stream on this machine: a TCP forwarder that does nothing but
 * move bytes between a client and the backend, one recv() and one send() per arrival, on one
 * thread with epoll, as the gateway's worker does. bench/run.py runs the (c) CPU figures
 * through it the same way as through the gateway, so the gateway's per-chunk cost can be read
 * against what the kernel alone charges for a wake-up, a receive and a send.
 *
 *   cc -O2 -o floor_proxy floor_proxy.c
 *   ./floor_proxy LISTEN_PORT BACKEND_PORT     (both on 127.0.0.1; prints "listening")
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 65536

static int peer[MAX_FDS];
static char buf[1 << 16];

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* Blocking send of what did not fit at once; loopback small writes nearly always fit. */
static int send_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EAGAIN) {
            struct pollfd w = {fd, POLLOUT, 0};
            poll(&w, 1, -1);
            continue;
        }
        if (k <= 0) return -1;
        p += k;
        n -= k;
    }
    return 0;
}

static void watch(int ep, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void drop(int fd) {
    int other = peer[fd];
    peer[fd] = peer[other] = -1; /* a later event in the same batch for either is stale */
    close(fd);
    close(other);
}

static void accept_one(int ep, int listener, int backend_port) {
    int client = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
    if (client < 0) return;
    int upstream = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in b = loopback(backend_port);
    int one = 1;
    if (client >= MAX_FDS || upstream < 0 || upstream >= MAX_FDS ||
        connect(upstream, (struct sockaddr *)&b, sizeof b) < 0) {
        close(client);
        if (upstream >= 0) close(upstream);
        return;
    }
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    peer[client] = upstream;
    peer[upstream] = client;
    watch(ep, client);
    watch(ep, upstream);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT\n", argv[0]);
        return 2;
    }
    int backend_port = atoi(argv[2]);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(atoi(argv[1]));
    if (bind(listener, (struct sockaddr *)&a, sizeof a) < 0 || listen(listener, 1024) < 0) {
        perror("floor_proxy: listen");
        return 1;
    }
    int ep = epoll_create1(0);
    watch(ep, listener);
    printf("listening\n");
    fflush(stdout);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                accept_one(ep, listener, backend_port);
                continue;
            }
            if (peer[fd] < 0) continue;
            ssize_t k = recv(fd, buf, sizeof buf, 0);
            if (k > 0 && send_all(peer[fd], buf, k) == 0) continue;
            if (k < 0 && errno == EAGAIN) continue;
            drop(fd);
        }
    }
}

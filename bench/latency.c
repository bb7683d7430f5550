/*
 * Open-loop HTTP/1.1 latency at a fixed request rate, with microsecond resolution (hey reports
 * 0.1 ms steps, too coarse for a 0.1 ms target). Requests are scheduled at start + i / rate on
 * keep-alive connections with one request in flight each; a request's latency runs from its
 * scheduled time to the end of its response, so a stalled connection is not hidden (no
 * coordinated omission). Built by scripts/bench.sh with the system C compiler.
 *
 *   latency HOST PORT RATE SECONDS CONNECTIONS
 *
 * Prints one JSON line: {"requests":N,"errors":N,"p50":ms,"p90":ms,"p99":ms,"max":ms}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256

struct conn {
  int fd;
  int busy;
  uint64_t scheduled; /* ns, of the request in flight */
  char buf[8192];
  size_t have;
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static void die(const char *what) {
  fprintf(stderr, "latency: %s: %s\n", what, strerror(errno));
  exit(1);
}

/* Complete response in c->buf? Returns its length, 0 if not yet, -1 if malformed. */
static long response_length(const struct conn *c) {
  const char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
  if (!end) return c->have >= sizeof(c->buf) ? -1 : 0;
  size_t header = (size_t)(end - c->buf) + 4;
  const char *cl = memmem(c->buf, header, "Content-Length:", 15);
  if (!cl) cl = memmem(c->buf, header, "content-length:", 15);
  if (!cl) return -1;
  long body = strtol(cl + 15, NULL, 10);
  if (body < 0 || header + (size_t)body > sizeof(c->buf)) return -1;
  return c->have >= header + (size_t)body ? (long)(header + (size_t)body) : 0;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: latency HOST PORT RATE SECONDS CONNECTIONS\n");
    return 2;
  }
  const char *host = argv[1], *port = argv[2];
  double rate = atof(argv[3]), seconds = atof(argv[4]);
  int nconns = atoi(argv[5]);
  if (rate <= 0 || seconds <= 0 || nconns < 1 || nconns > MAX_CONNS) {
    fprintf(stderr, "latency: bad arguments\n");
    return 2;
  }
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *ai;
  if (getaddrinfo(host, port, &hints, &ai) != 0) {
    fprintf(stderr, "latency: %s is not a numeric address\n", host);
    return 2;
  }
  char request[512];
  int reqlen = snprintf(request, sizeof(request), "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: nodemesh-bench\r\n\r\n", host);

  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct conn *conns = calloc((size_t)nconns, sizeof(struct conn));
  for (int i = 0; i < nconns; i++) {
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) die("connect");
    conns[i].fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  }
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
  epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

  uint64_t total = (uint64_t)(rate * seconds), interval = (uint64_t)(1e9 / rate);
  uint64_t *lat = calloc(total, sizeof(uint64_t));
  uint64_t done = 0, sent = 0, errors = 0, start = now_ns() + 10000000ull;
  /* Scheduled requests that found every connection busy wait here, their clock running. */
  uint64_t *queue = calloc(total, sizeof(uint64_t));
  uint64_t qhead = 0, qtail = 0;
  uint64_t deadline = start + (uint64_t)(seconds * 1e9) + 5000000000ull;

  while (done + errors < total && now_ns() < deadline) {
    uint64_t t = now_ns();
    while (sent < total && start + sent * interval <= t) queue[qtail++] = start + sent++ * interval;
    for (int i = 0; i < nconns && qhead < qtail; i++) {
      if (conns[i].busy) continue;
      conns[i].busy = 1;
      conns[i].scheduled = queue[qhead++];
      conns[i].have = 0;
      if (write(conns[i].fd, request, (size_t)reqlen) != reqlen) die("write");
    }
    if (sent < total) {
      uint64_t next = start + sent * interval;
      struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next / 1000000000ull), .tv_nsec = (long)(next % 1000000000ull)}};
      timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    }
    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, 100);
    for (int k = 0; k < n; k++) {
      if (evs[k].data.u32 == UINT32_MAX) {
        uint64_t v;
        while (read(tfd, &v, sizeof(v)) > 0) {
        }
        continue;
      }
      struct conn *c = &conns[evs[k].data.u32];
      ssize_t r = read(c->fd, c->buf + c->have, sizeof(c->buf) - c->have);
      if (r <= 0) {
        fprintf(stderr, "latency: connection %u closed\n", evs[k].data.u32);
        return 1;
      }
      c->have += (size_t)r;
      long len = response_length(c);
      if (len < 0) {
        fprintf(stderr, "latency: malformed response\n");
        return 1;
      }
      if (len == 0 || !c->busy) continue;
      uint64_t end = now_ns();
      c->busy = 0;
      if (memcmp(c->buf, "HTTP/1.1 200", 12) != 0) errors++;
      else lat[done++] = end - c->scheduled;
    }
  }
  if (done == 0) {
    fprintf(stderr, "latency: no responses\n");
    return 1;
  }
  qsort(lat, done, sizeof(uint64_t), cmp_u64);
#define PCT(p) ((double)lat[(size_t)((double)(done - 1) * (p))] / 1e6)
  printf("{\"requests\":%llu,\"errors\":%llu,\"missing\":%llu,\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"max\":%.4f}\n", (unsigned long long)done,
         (unsigned long long)errors, (unsigned long long)(total - done - errors), PCT(0.5), PCT(0.9), PCT(0.99), (double)lat[done - 1] / 1e6);
  return 0;
}

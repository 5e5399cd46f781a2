/*
 * tstream: carry a checked byte pattern over TCP, so that loss, duplication,
 * reordering or corruption anywhere on the path (including across a live
 * migration of the VM it runs in) shows up at its exact byte offset.
 *
 * The pattern (the same in tests/vm/pattern.py, which is the reference):
 *     key(seed) = (seed + 1) * 0x9E3779B97F4A7C15  mod 2^64
 *     word(k)   = k XOR key(seed)                   (k = 0, 1, 2, ...)
 *     byte(i)   = byte (i mod 8) of word(i div 8), little-endian
 * i.e. a 64-bit counter stream masked by a per-seed key.  Seeds that differ
 * mod 256 differ at byte 0; any shift of the stream changes some byte of
 * every word, so the first mismatch is within 8 bytes of where it went wrong.
 *
 * Usage: tstream [-g] [-w SECONDS] [-r BYTES_PER_SEC] [-d SECONDS] [-t IDLE_SECONDS] [-p FILE] MODE ...
 *     send HOST PORT BYTES [SEED]     connect, send, shut down writing, wait for close
 *     recv HOST PORT [SEED]           connect, read to EOF, verify
 *     serve PORT send BYTES [SEED]    listen (PORT 0: any), accept one, then as send
 *     serve PORT recv [SEED]          listen, accept one, then as recv
 *     rr HOST PORT CONNS EXCHANGES    CONNS connections one after another, each
 *                                     EXCHANGES 1-byte requests, each echoed
 *     serve PORT echo [CONNS]         accept CONNS connections (0: forever) one
 *                                     after another, echo each until EOF
 * BYTES takes a K/M/G suffix (powers of 1024); 0 means no limit (needs -d).
 * -w waits SECONDS before recv's first read (data queues up, a FIN with it).
 * -g adds "gap_max_us=U" to recv's ok line: the longest wait for data, from
 * the start (connected or accepted) to the first byte and between reads.
 * -r limits the rate (either direction), -d stops sending after SECONDS,
 * -t fails when nothing moves for IDLE_SECONDS, -p rewrites FILE every second
 * with "TSTREAM progress bytes=N seconds=S".  HOST is a numeric IPv4/IPv6
 * address (no resolver: the binary is static).
 *
 * Result, one line on stdout:
 *     TSTREAM sent=N                                     exit 0
 *     TSTREAM ok bytes=N                                 exit 0
 *     TSTREAM bad offset=K expected=0xXX found=0xYY      exit 1
 *     TSTREAM error KIND after=N                         exit 3 (detail on stderr)
 *     TSTREAM rr conns=C exchanges=E seconds=S connect_max_us=U first_median_us=U
 *         first_max_us=U rtt_median_us=U rtt_seconds=S   exit 0
 * rr's "first" is time to first byte: from connect() until the first echo is
 * back, i.e. the handshake plus one round trip; "rtt" covers the exchanges
 * after the first on each connection (rtt_seconds: their total time).  serve echo prints "TSTREAM echoed
 * conns=C bytes=N".
 * where KIND is reset, connect, idle, io, listen.  serve prints
 * "TSTREAM listening port=P" on stderr once it accepts connections.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define CHUNK 65536
#define TICK_MS 200 /* how often progress, idle and duration are looked at */

static uint64_t key;
static uint64_t rate;      /* bytes per second, 0: unlimited */
static double duration;    /* seconds of sending, 0: none */
static double idle_limit;  /* seconds without progress before failing, 0: none */
static const char *progress_path;
static int report_gap;     /* -g */
static double read_delay;  /* -w: seconds before the first read */
static uint64_t done;      /* bytes sent, or received and verified */
static double t_start, t_progress, t_activity;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint8_t pattern_byte(uint64_t i)
{
	return (uint8_t)(((i >> 3) ^ key) >> (8 * (i & 7)));
}

/* The pattern bytes [off, off + len): whole words where aligned, for speed. */
static void fill(uint8_t *buf, uint64_t off, size_t len)
{
	size_t j = 0;

	for (; j < len && ((off + j) & 7); j++)
		buf[j] = pattern_byte(off + j);
	for (; j + 8 <= len; j += 8) {
		uint64_t w = htole64(((off + j) >> 3) ^ key);

		memcpy(buf + j, &w, 8);
	}
	for (; j < len; j++)
		buf[j] = pattern_byte(off + j);
}

static void write_progress(double now)
{
	char tmp[4096];
	FILE *f;

	t_progress = now;
	/* Written aside and renamed, so a reader never sees half a line. */
	snprintf(tmp, sizeof(tmp), "%s.tmp", progress_path);
	f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "TSTREAM progress bytes=%" PRIu64 " seconds=%.1f\n", done, now - t_start);
	if (fclose(f) == 0)
		rename(tmp, progress_path);
}

static void __attribute__((noreturn)) fail(const char *kind, const char *detail, int err)
{
	if (progress_path)
		write_progress(now_s());
	printf("TSTREAM error %s after=%" PRIu64 "\n", kind, done);
	fflush(stdout);
	fprintf(stderr, "tstream: %s%s%s\n", detail, err ? ": " : "", err ? strerror(err) : "");
	exit(3);
}

/* A socket error: a reset (or a write after one) is the error tests look for. */
static void __attribute__((noreturn)) fail_io(const char *what, int err)
{
	if (err == ECONNRESET || err == EPIPE)
		fail("reset", what, err);
	fail("io", what, err);
}

static void tick(void)
{
	double now = now_s();

	if (progress_path && now - t_progress >= 1.0)
		write_progress(now);
	if (idle_limit > 0 && now - t_activity > idle_limit)
		fail("idle", "no progress within the -t limit", 0);
}

/* Block until fd is ready for events, looking at the clock meanwhile. */
static void wait_ready(int fd, short events)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int n = poll(&p, 1, TICK_MS);

		if (n < 0 && errno != EINTR)
			fail("io", "poll", errno);
		tick();
		if (n > 0)
			return;
	}
}

/* With -r: wait until at least `want` more bytes are allowed; return how many. */
static size_t throttle(size_t want)
{
	for (;;) {
		double allowed = (double)rate * (now_s() - t_start) - (double)done;
		double wait;
		struct timespec ts;

		if (!rate || allowed >= (double)want)
			return want;
		if (allowed >= 1 && allowed >= (double)(rate / 50))
			return (size_t)allowed; /* at least 20 ms worth: worth a call */
		wait = ((double)want - allowed) / (double)rate;
		if (wait > TICK_MS / 1000.0)
			wait = TICK_MS / 1000.0;
		ts.tv_sec = 0;
		ts.tv_nsec = (long)(wait * 1e9);
		nanosleep(&ts, NULL); /* EINTR: just look again */
		t_activity = now_s(); /* waiting on purpose is not idleness */
		tick();
	}
}

static void do_send(int fd, uint64_t total)
{
	static uint8_t buf[CHUNK];
	char sink[4096];

	for (;;) {
		size_t len = CHUNK;
		ssize_t n;

		if (duration > 0 && now_s() - t_start >= duration)
			break;
		if (total && done >= total)
			break;
		if (total && total - done < len)
			len = (size_t)(total - done);
		len = throttle(len);
		fill(buf, done, len);
		n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				wait_ready(fd, POLLOUT);
				continue;
			}
			fail_io("send", errno);
		}
		done += (uint64_t)n; /* a short write: the rest goes next round */
		t_activity = now_s();
		tick();
	}
	if (shutdown(fd, SHUT_WR) < 0)
		fail_io("shutdown", errno);
	/* The peer closes once it has read everything: only then is it delivered. */
	for (;;) {
		ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);

		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				wait_ready(fd, POLLIN);
				continue;
			}
			fail_io("waiting for the peer to close", errno);
		}
	}
	if (progress_path)
		write_progress(now_s());
	printf("TSTREAM sent=%" PRIu64 "\n", done);
}

static int do_recv(int fd)
{
	static uint8_t buf[CHUNK], expected[CHUNK];
	double last, gap_max = 0;

	while (read_delay > 0 && now_s() - t_start < read_delay) {
		struct timespec ts = { .tv_nsec = TICK_MS * 1000000L };

		nanosleep(&ts, NULL);
		t_activity = now_s(); /* waiting on purpose is not idleness */
		tick();
	}
	last = now_s();

	for (;;) {
		ssize_t n = recv(fd, buf, throttle(CHUNK), MSG_DONTWAIT);

		if (n >= 0) {
			double now = now_s();

			if (now - last > gap_max)
				gap_max = now - last;
			last = now;
		}
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				wait_ready(fd, POLLIN);
				continue;
			}
			fail_io("recv", errno);
		}
		fill(expected, done, (size_t)n);
		if (memcmp(buf, expected, (size_t)n)) {
			size_t j = 0;

			while (buf[j] == expected[j])
				j++;
			done += j;
			if (progress_path)
				write_progress(now_s());
			printf("TSTREAM bad offset=%" PRIu64 " expected=0x%02x found=0x%02x\n",
			       done, expected[j], buf[j]);
			return 1;
		}
		done += (uint64_t)n;
		t_activity = now_s();
		tick();
	}
	if (progress_path)
		write_progress(now_s());
	if (report_gap)
		printf("TSTREAM ok bytes=%" PRIu64 " gap_max_us=%.0f\n", done, gap_max * 1e6);
	else
		printf("TSTREAM ok bytes=%" PRIu64 "\n", done);
	return 0;
}

static int connect_to(const char *host, const char *port_s)
{
	struct sockaddr_storage ss = { 0 };
	struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
	uint16_t port = (uint16_t)atoi(port_s);
	socklen_t len;
	int fd, err = 0;

	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(port);
		len = sizeof(*a4);
	} else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(port);
		len = sizeof(*a6);
	} else {
		fprintf(stderr, "tstream: %s: not a numeric IPv4 or IPv6 address\n", host);
		exit(2);
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("connect", "socket", errno);
	if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
		socklen_t elen = sizeof(err);

		if (errno != EINTR)
			fail("connect", "connect", errno);
		/* Interrupted: the connection goes on; wait for its outcome. */
		wait_ready(fd, POLLOUT);
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
			err = errno;
		if (err)
			fail("connect", "connect", err);
	}
	return fd;
}

static int serve(const char *port_s)
{
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT };
	struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY) };
	struct sockaddr_storage bound;
	socklen_t blen = sizeof(bound);
	int one = 1, zero = 0, lfd;
	uint16_t port = (uint16_t)atoi(port_s);

	/* Dual-stack where the kernel has IPv6, IPv4 only otherwise. */
	lfd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd >= 0) {
		setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		a6.sin6_port = htons(port);
		if (bind(lfd, (struct sockaddr *)&a6, sizeof(a6)) < 0)
			fail("listen", "bind", errno);
	} else {
		lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (lfd < 0)
			fail("listen", "socket", errno);
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		a4.sin_port = htons(port);
		if (bind(lfd, (struct sockaddr *)&a4, sizeof(a4)) < 0)
			fail("listen", "bind", errno);
	}
	if (listen(lfd, 16) < 0 || getsockname(lfd, (struct sockaddr *)&bound, &blen) < 0)
		fail("listen", "listen", errno);
	port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
						 : ((struct sockaddr_in *)&bound)->sin_port);
	fprintf(stderr, "TSTREAM listening port=%u\n", port);
	fflush(stderr);
	return lfd;
}

static int accept_one(int lfd)
{
	int fd;

	do
		fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
		fail("listen", "accept", errno);
	return fd;
}

static double now_us(void)
{
	return now_s() * 1e6;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, size_t n)
{
	if (!n)
		return 0;
	qsort(v, n, sizeof(*v), cmp_double);
	return v[n / 2];
}

static double max_of(const double *v, size_t n)
{
	double m = 0;

	for (size_t i = 0; i < n; i++)
		if (v[i] > m)
			m = v[i];
	return m;
}

/* One byte there and back: blocking calls, as a request/response client does. */
static void exchange(int fd)
{
	char c = 'x';
	ssize_t n;

	do
		n = send(fd, &c, 1, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != 1)
		fail_io("rr send", n < 0 ? errno : 0);
	do
		n = recv(fd, &c, 1, 0);
	while (n < 0 && errno == EINTR);
	if (n == 0)
		fail("reset", "rr: the peer closed", 0);
	if (n < 0)
		fail_io("rr recv", errno);
	done++;
}

static int do_rr(const char *host, const char *port, uint64_t conns, uint64_t exchanges)
{
	double *connect_us = calloc(conns, sizeof(double));
	double *first_us = calloc(conns, sizeof(double));
	double *rtt_us = calloc(conns * (exchanges - 1) + 1, sizeof(double));
	size_t nrtt = 0;
	double rtt_total = 0;
	int one = 1;

	if (!connect_us || !first_us || !rtt_us)
		fail("io", "out of memory", 0);
	for (uint64_t c = 0; c < conns; c++) {
		double t0 = now_us(), t1;
		int fd = connect_to(host, port);

		connect_us[c] = now_us() - t0;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		exchange(fd);
		first_us[c] = now_us() - t0;
		for (uint64_t e = 1; e < exchanges; e++) {
			t1 = now_us();
			exchange(fd);
			rtt_us[nrtt++] = now_us() - t1;
		}
		close(fd);
	}
	for (size_t i = 0; i < nrtt; i++)
		rtt_total += rtt_us[i];
	printf("TSTREAM rr conns=%" PRIu64 " exchanges=%" PRIu64 " seconds=%.6f"
	       " connect_max_us=%.0f first_median_us=%.0f first_max_us=%.0f rtt_median_us=%.0f"
	       " rtt_seconds=%.6f\n",
	       conns, exchanges, now_s() - t_start, max_of(connect_us, conns),
	       median(first_us, conns), max_of(first_us, conns), median(rtt_us, nrtt),
	       rtt_total / 1e6);
	return 0;
}

static int do_echo(int lfd, uint64_t conns)
{
	static char buf[CHUNK];
	uint64_t served = 0;
	int one = 1;

	while (!conns || served < conns) {
		int fd = accept_one(lfd);

		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		for (;;) {
			ssize_t n = recv(fd, buf, sizeof(buf), 0), off = 0;

			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				fail_io("echo recv", errno);
			if (n == 0)
				break;
			while (off < n) {
				ssize_t w = send(fd, buf + off, (size_t)(n - off), MSG_NOSIGNAL);

				if (w < 0 && errno == EINTR)
					continue;
				if (w < 0)
					fail_io("echo send", errno);
				off += w;
			}
			done += (uint64_t)n;
		}
		close(fd);
		served++;
	}
	printf("TSTREAM echoed conns=%" PRIu64 " bytes=%" PRIu64 "\n", served, done);
	return 0;
}

static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		goto bad;
	switch (*end) {
	case 'G': v <<= 10; /* fall through */
	case 'M': v <<= 10; /* fall through */
	case 'K': v <<= 10; end++; break;
	}
	if (!*end)
		return v;
bad:
	fprintf(stderr, "tstream: bad number: %s\n", s);
	exit(2);
}

static void __attribute__((noreturn)) usage(void)
{
	fprintf(stderr,
		"usage: tstream [-g] [-w SECONDS] [-r BYTES_PER_SEC] [-d SECONDS] [-t IDLE_SECONDS] [-p FILE] MODE ...\n"
		"  send HOST PORT BYTES [SEED]\n"
		"  recv HOST PORT [SEED]\n"
		"  serve PORT send BYTES [SEED]\n"
		"  serve PORT recv [SEED]\n"
		"  rr HOST PORT CONNS EXCHANGES\n"
		"  serve PORT echo [CONNS]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *mode, *host = NULL, *port;
	uint64_t total = 0, seed = 0;
	int opt, fd, nargs;
	char **args;

	while ((opt = getopt(argc, argv, "+r:d:t:p:gw:")) != -1) {
		switch (opt) {
		case 'r': rate = parse_size(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 't': idle_limit = atof(optarg); break;
		case 'p': progress_path = optarg; break;
		case 'g': report_gap = 1; break;
		case 'w': read_delay = atof(optarg); break;
		default: usage();
		}
	}
	args = argv + optind;
	nargs = argc - optind;
	if (nargs < 1)
		usage();
	if (!strcmp(args[0], "serve")) {
		if (nargs < 3)
			usage();
		port = args[1];
		args += 2;
		nargs -= 2;
	} else {
		if (nargs < 3)
			usage();
		host = args[1];
		port = args[2];
		args[2] = args[0]; /* the mode, followed by its arguments */
		args += 2;
		nargs -= 2;
	}
	mode = args[0];
	if (!strcmp(mode, "send")) {
		if (nargs < 2 || nargs > 3)
			usage();
		total = parse_size(args[1]);
		if (nargs == 3)
			seed = parse_size(args[2]);
		if (!total && duration <= 0) {
			fprintf(stderr, "tstream: BYTES 0 (no limit) needs -d\n");
			exit(2);
		}
	} else if (!strcmp(mode, "recv")) {
		if (nargs > 2)
			usage();
		if (nargs == 2)
			seed = parse_size(args[1]);
	} else if (!strcmp(mode, "rr")) {
		if (!host || nargs != 3)
			usage();
		total = parse_size(args[1]);
		seed = parse_size(args[2]); /* exchanges per connection */
		if (!total || !seed)
			usage();
	} else if (!strcmp(mode, "echo")) {
		if (host || nargs > 2)
			usage();
		if (nargs == 2)
			total = parse_size(args[1]);
	} else {
		usage();
	}
	key = (seed + 1) * GOLDEN;
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);

	if (!strcmp(mode, "rr")) {
		t_start = now_s();
		return do_rr(host, port, total, seed);
	}
	if (!strcmp(mode, "echo"))
		return do_echo(serve(port), total);
	if (host) {
		fd = connect_to(host, port);
	} else {
		int lfd = serve(port);

		fd = accept_one(lfd);
		close(lfd);
	}
	t_start = t_activity = t_progress = now_s();
	if (progress_path)
		write_progress(t_start);
	if (!strcmp(mode, "send")) {
		do_send(fd, total);
		return 0;
	}
	return do_recv(fd);
}

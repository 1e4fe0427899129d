/*
 * rawxfer N REQ RESP K OUT [busy]: the raw transport of benchmarks/offload_io.py.
 *
 * K clients (processes) each make N round trips over loopback TCP
 * (TCP_NODELAY) to a server that is C as well (a process per connection):
 * the client sends REQ bytes in one ZMTP long frame (9-byte header, as the
 * relay frames a CALL), the server reads the whole frame, touches nothing
 * else, and answers RESP bytes in one frame (the same framing); the client
 * reads the whole answer.  So the same bytes cross the same kind of socket
 * as an offloaded call's CALL and RESULT, with no interpreter, no msgpack
 * and no system call executed at either end.  Blocking send/recv, or with
 * "busy" recv(MSG_DONTWAIT) spinning.
 *
 * OUT gets, per client, N+2 little-endian u64: its loop's start and end
 * (CLOCK_MONOTONIC ns) and the N round-trip times (written by the clients
 * into shared memory).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int xfer(int fd, uint8_t *p, size_t len, int out, int busy)
{
	while (len) {
		ssize_t r = out ? send(fd, p, len, MSG_NOSIGNAL) :
				  recv(fd, p, len, busy ? MSG_DONTWAIT : 0);

		if (r < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (r <= 0)
			return -1;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

/* One framed message: 9-byte ZMTP long-frame header + body (body already in buf + 9). */
static int send_frame(int fd, uint8_t *buf, size_t body)
{
	buf[0] = 0x02;
	for (int i = 0; i < 8; i++)
		buf[1 + i] = (uint8_t)(body >> (56 - 8 * i));
	return xfer(fd, buf, body + 9, 1, 0);
}

static int recv_frame(int fd, uint8_t *buf, size_t cap, int busy)
{
	uint64_t size = 0;

	if (xfer(fd, buf, 9, 0, busy))
		return -1;
	for (int i = 1; i < 9; i++)
		size = size << 8 | buf[i];
	if (size > cap)
		return -1;
	return xfer(fd, buf + 9, (size_t)size, 0, busy);
}

static void serve(int c, size_t req, size_t resp)
{
	size_t cap = (req > resp ? req : resp) + 16;
	uint8_t *buf = calloc(1, cap);

	while (buf && recv_frame(c, buf, cap, 0) == 0)
		if (send_frame(c, buf, resp))
			break;
	_exit(0);
}

int main(int argc, char **argv)
{
	if (argc != 6 && argc != 7)
		return 2;
	long n = atol(argv[1]);
	size_t req = (size_t)atol(argv[2]), resp = (size_t)atol(argv[3]);
	int k = atoi(argv[4]), busy = argc == 7 && strcmp(argv[6], "busy") == 0, one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	size_t cap = (req > resp ? req : resp) + 16;
	size_t words = (size_t)(k > 0 ? k : 1) * (size_t)(n > 0 ? n + 2 : 1);
	uint64_t *all = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (n < 1 || k < 1 || all == MAP_FAILED || ls < 0 || bind(ls, (struct sockaddr *)&a, alen) ||
	    listen(ls, 64) || getsockname(ls, (struct sockaddr *)&a, &alen))
		return 3;
	pid_t server = fork();

	if (server == 0) { /* accept K connections, one serving process each */
		for (int i = 0; i < k; i++) {
			int c = accept(ls, NULL, NULL);

			if (c < 0)
				_exit(1);
			setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			if (fork() == 0)
				serve(c, req, resp);
			close(c);
		}
		while (wait(NULL) > 0)
			;
		_exit(0);
	}
	close(ls);
	for (int i = 0; i < k; i++) {
		if (fork() == 0) {
			uint8_t *buf = calloc(1, cap);
			uint64_t *lat = all + (size_t)i * (size_t)(n + 2);
			int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

			if (!buf || s < 0 || connect(s, (struct sockaddr *)&a, alen))
				_exit(4);
			setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			lat[0] = now_ns();
			for (long j = 0; j < n; j++) {
				uint64_t t0 = now_ns();

				if (send_frame(s, buf, req) || recv_frame(s, buf, cap, busy))
					_exit(5);
				lat[j + 2] = now_ns() - t0;
			}
			lat[1] = now_ns();
			close(s);
			_exit(0);
		}
	}
	int status, bad = 0;

	for (int i = 0; i < k + 1; i++)
		if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			bad = 1;
	FILE *f = fopen(argv[5], "wb");

	if (bad || !f || fwrite(all, 8, words, f) != words ||
	    fclose(f))
		return 8;
	return 0;
}

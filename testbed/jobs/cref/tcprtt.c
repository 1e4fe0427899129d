/*
 * tcprtt N REQ RESP OUT [busy] [unix]: the C reference for the transport.
 *
 * N round trips over loopback TCP (TCP_NODELAY), or with "unix" over a Unix
 * stream socket pair (what an ipc:// endpoint is): the client sends REQ
 * bytes, a forked echo server answers RESP bytes.  The client waits in a
 * blocking recv(2), or with "busy" spins on recv(MSG_DONTWAIT).  Latencies
 * (ns, u32) go to OUT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int xfer(int fd, char *p, size_t len, int out, int busy)
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

/* A connected loopback TCP pair (TCP_NODELAY on both ends): sv[0] client, sv[1] server. */
static int tcp_pair(int sv[2])
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (ls < 0 || bind(ls, (struct sockaddr *)&a, alen) || listen(ls, 1) ||
	    getsockname(ls, (struct sockaddr *)&a, &alen))
		return -1;
	sv[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sv[0] < 0 || connect(sv[0], (struct sockaddr *)&a, alen))
		return -1;
	sv[1] = accept(ls, NULL, NULL);
	close(ls);
	if (sv[1] < 0)
		return -1;
	setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(sv[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 5 || argc > 7)
		return 2;
	long n = atol(argv[1]);
	size_t req = (size_t)atol(argv[2]), resp = (size_t)atol(argv[3]);
	int busy = 0, unix_ = 0, status, sv[2];

	for (int i = 5; i < argc; i++) {
		if (strcmp(argv[i], "busy") == 0)
			busy = 1;
		else if (strcmp(argv[i], "unix") == 0)
			unix_ = 1;
		else
			return 2;
	}
	char *buf = calloc(1, (req > resp ? req : resp) + 1);
	uint32_t *lat = malloc((size_t)n * sizeof(*lat));

	if (!buf || !lat ||
	    (unix_ ? socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) : tcp_pair(sv)))
		return 3;
	pid_t pid = fork();

	if (pid == 0) {
		close(sv[0]);
		for (long i = 0; i < n; i++)
			if (xfer(sv[1], buf, req, 0, 0) || xfer(sv[1], buf, resp, 1, 0))
				_exit(5);
		_exit(0);
	}
	int c = sv[0];

	close(sv[1]);
	if (pid < 0)
		return 6;
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();

		if (xfer(c, buf, req, 1, 0) || xfer(c, buf, resp, 0, busy))
			return 7;
		lat[i] = (uint32_t)(now_ns() - t0);
	}
	close(c);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
		return 8;
	FILE *f = fopen(argv[4], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n, f) != (size_t)n || fclose(f))
		return 9;
	return 0;
}

/*
 * futexrtt N REQ RESP OUT [busy]: the C reference for a shared-memory transport.
 *
 * N round trips between two threads of one process, pinned to two different
 * CPUs (the first two this process may use; unpinned when it may use one):
 * the client copies REQ bytes into a shared buffer, flips a futex word to
 * the server's turn and wakes it (FUTEX_WAKE); the server copies them out,
 * copies RESP bytes back, flips the word back and wakes the client.  Each
 * side waits in FUTEX_WAIT, or with "busy" the client spins on the word.
 * No socket, no kernel buffer: two wake-ups and two cache-line transfers per
 * round trip, the floor under anything that hands calls over through memory.
 * Latencies (ns, u32) go to OUT; stdout says which CPUs ("cpus=0,1").
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint32_t turn; /* 0: the client's (a reply is ready), 1: the server's (a request is) */
static char *shared;
static long n;
static size_t req, resp;
static int cpu[2] = { -1, -1 };

static void futex(uint32_t *w, int op, uint32_t val)
{
	syscall(SYS_futex, w, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static void wait_while(uint32_t v, int busy)
{
	while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) == v)
		if (!busy)
			futex(&turn, FUTEX_WAIT, v);
}

static void give(uint32_t v)
{
	__atomic_store_n(&turn, v, __ATOMIC_RELEASE);
	futex(&turn, FUTEX_WAKE, 1);
}

static void pin(int c)
{
	cpu_set_t set;

	if (c < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(c, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *server(void *arg)
{
	char *buf = arg;

	pin(cpu[1]);
	for (long i = 0; i < n; i++) {
		wait_while(0, 0);
		memcpy(buf, shared, req);
		memcpy(shared, buf, resp);
		give(0);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5 && argc != 6)
		return 2;
	n = atol(argv[1]);
	req = (size_t)atol(argv[2]);
	resp = (size_t)atol(argv[3]);
	int busy = argc == 6 && strcmp(argv[5], "busy") == 0;
	size_t big = (req > resp ? req : resp) + 1;
	char *buf = calloc(1, big), *sbuf = calloc(1, big);
	uint32_t *lat = malloc((size_t)n * sizeof(*lat));
	cpu_set_t set;
	pthread_t t;

	shared = calloc(1, big);
	if (!buf || !sbuf || !lat || !shared || sched_getaffinity(0, sizeof(set), &set))
		return 3;
	for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++)
		if (CPU_ISSET(c, &set))
			cpu[k++] = c;
	if (cpu[1] < 0)
		cpu[0] = -1;
	if (pthread_create(&t, NULL, server, sbuf))
		return 4;
	pin(cpu[0]);
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();

		memcpy(shared, buf, req);
		give(1);
		wait_while(1, busy);
		memcpy(buf, shared, resp);
		lat[i] = (uint32_t)(now_ns() - t0);
	}
	if (pthread_join(t, NULL))
		return 5;
	if (cpu[1] < 0)
		printf("cpus=unpinned\n");
	else
		printf("cpus=%d,%d\n", cpu[0], cpu[1]);
	FILE *f = fopen(argv[4], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n, f) != (size_t)n || fclose(f))
		return 9;
	return 0;
}

/*
 * ioloop MODE N SIZE PATH OUT [SRC]: the C reference workload of
 * benchmarks/offload_io.py (no interpreter in the timed loop).
 *
 *   w  N timed write(2) of SIZE bytes to PATH (created, truncated)
 *   r  N timed read(2) of SIZE bytes from PATH (from its start)
 *   c  N timed rounds of read(2) SIZE bytes from SRC + write(2) them to PATH
 *      (a copy, as cp does it when copy_file_range is refused)
 *
 * OUT gets N+2 little-endian u64: the loop's start and end (CLOCK_MONOTONIC,
 * ns, comparable across processes) and the N per-call (per-round) times.
 * Exit 4 if a call moved fewer bytes than asked.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 6 && argc != 7)
		return 2;
	char mode = argv[1][0];
	long n = atol(argv[2]);
	size_t size = (size_t)atol(argv[3]);
	int fd = mode == 'r' ? open(argv[4], O_RDONLY) : open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int src = mode == 'c' ? (argc == 7 ? open(argv[6], O_RDONLY) : -1) : 0;
	char *buf = malloc(size);
	uint64_t *lat = malloc((size_t)(n + 2) * sizeof(*lat));

	if (fd < 0 || src < 0 || !buf || !lat || n < 1)
		return 3;
	for (size_t i = 0; i < size; i++)
		buf[i] = (char)(i * 7 + 1);
	lat[0] = now_ns();
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		ssize_t got;

		if (mode == 'c') {
			got = read(src, buf, size);
			if (got == (ssize_t)size)
				got = write(fd, buf, size);
		} else {
			got = mode == 'w' ? write(fd, buf, size) : read(fd, buf, size);
		}
		lat[i + 2] = now_ns() - t0;
		if (got != (ssize_t)size)
			return 4;
	}
	lat[1] = now_ns();
	close(fd);
	FILE *f = fopen(argv[5], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n + 2, f) != (size_t)n + 2 || fclose(f))
		return 5;
	return 0;
}

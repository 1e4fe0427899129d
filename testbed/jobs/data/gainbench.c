// SPDX-License-Identifier: GPL-2.0-only
/*
 * gainbench: the testbed's gain benchmark (the paper's section IV, Figs. 12-13).
 *
 *   gainbench GAMMA PHASES SAMPLES
 *
 * PHASES times: a computation phase (Monte Carlo pi over SAMPLES / GAMMA
 * points, so its time shrinks by the gain GAMMA) followed by a fixed system
 * call phase (the same calls at every GAMMA).  At the end one line goes to
 * stdout: the pi estimate, which depends on GAMMA only.
 *
 * Built without libc (-nostdlib -static, raw x86-64 syscall instructions) so
 * the program makes exactly the calls of its design and nothing else: no
 * dynamic loader, no libc start-up.  The per-phase counts come from
 * testbed/gain.py (MIX) as -D definitions; the defaults below are the same.
 */

#ifndef N_WRITE
#define N_WRITE 500
#endif
#ifndef N_LSEEK
#define N_LSEEK 120
#endif
#ifndef N_READ
#define N_READ 60
#endif
#ifndef N_FSTAT
#define N_FSTAT 6
#endif
#ifndef N_GETPPID
#define N_GETPPID 3
#endif
#ifndef N_UNAME
#define N_UNAME 1
#endif

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_fstat 5
#define SYS_lseek 8
#define SYS_getppid 110
#define SYS_uname 63
#define SYS_exit_group 231
#define SYS_openat 257
#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_WRONLY 1

typedef unsigned long u64;

static long sys3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long sys4(long nr, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static char buf[4096];
static char statbuf[256];
static char utsbuf[512];

static __attribute__((noreturn)) void die(int code)
{
	for (;;)
		sys3(SYS_exit_group, code, 0, 0);
}

static u64 parse(const char *s)
{
	u64 v = 0;

	if (!s || !*s)
		die(2);
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			die(2);
		v = v * 10 + (u64)(*s - '0');
	}
	return v;
}

/* Monte Carlo pi: points in [0, 2^31)^2, hit when inside the quarter circle. */
static u64 compute(u64 samples, u64 *state)
{
	u64 x = *state, hits = 0, i;

	for (i = 0; i < samples; i++) {
		u64 a, b;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		a = x >> 33;
		b = (x >> 2) & 0x7fffffffUL;
		hits += (a * a + b * b) < (1UL << 62);
	}
	*state = x;
	return hits;
}

static void syscalls(long fd_null, long fd_zero)
{
	int i;

	for (i = 0; i < N_WRITE; i++)
		sys3(SYS_write, fd_null, (long)buf, 512L << (i % 4));
	for (i = 0; i < N_LSEEK; i++)
		sys3(SYS_lseek, fd_null, 0, 0);
	for (i = 0; i < N_READ; i++)
		sys3(SYS_read, fd_zero, (long)buf, sizeof(buf));
	for (i = 0; i < N_FSTAT; i++)
		sys3(SYS_fstat, fd_zero, (long)statbuf, 0);
	for (i = 0; i < N_GETPPID; i++)
		sys3(SYS_getppid, 0, 0, 0);
	for (i = 0; i < N_UNAME; i++)
		sys3(SYS_uname, (long)utsbuf, 0, 0);
}

static int fmt(char *out, u64 v)
{
	char tmp[24];
	int n = 0, k = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		out[k++] = tmp[--n];
	return k;
}

static int put(char *out, const char *s)
{
	int k = 0;

	while (s[k]) {
		out[k] = s[k];
		k++;
	}
	return k;
}

int gain_main(u64 argc, char **argv)
{
	u64 gamma, phases, samples, per, p, hits = 0, total = 0, state = 88172645463325252UL;
	long fd_null, fd_zero;
	char line[160];
	int k = 0;

	if (argc != 4)
		die(2);
	gamma = parse(argv[1]);
	phases = parse(argv[2]);
	samples = parse(argv[3]);
	if (gamma == 0 || phases == 0)
		die(2);
	per = samples / gamma;
	fd_null = sys4(SYS_openat, AT_FDCWD, (long)"/dev/null", O_WRONLY, 0);
	fd_zero = sys4(SYS_openat, AT_FDCWD, (long)"/dev/zero", O_RDONLY, 0);
	if (fd_null < 0 || fd_zero < 0)
		die(1);
	for (p = 0; p < phases; p++) {
		hits += compute(per, &state);
		total += per;
		syscalls(fd_null, fd_zero);
	}
	sys3(SYS_close, fd_zero, 0, 0);
	sys3(SYS_close, fd_null, 0, 0);
	k += put(line + k, "gainbench gamma ");
	k += fmt(line + k, gamma);
	k += put(line + k, " samples ");
	k += fmt(line + k, total);
	k += put(line + k, " pi_x1e6 ");
	k += fmt(line + k, total ? 4000000UL * hits / total : 0);
	line[k++] = '\n';
	sys3(SYS_write, 1, (long)line, k);
	return 0;
}

/* Entry point: the kernel leaves argc at (%rsp) and argv right after it. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %rbp, %rbp\n"
	"	mov (%rsp), %rdi\n"
	"	lea 8(%rsp), %rsi\n"
	"	and $-16, %rsp\n"
	"	call gain_main\n"
	"	mov %rax, %rdi\n"
	"	mov $231, %rax\n"
	"	syscall\n"
	"	hlt\n");

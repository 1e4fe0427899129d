/*
 * trapcont N SIZE OUT: the C reference for "trap-only".
 *
 * A child installs a seccomp filter that sends write(2) to user notification
 * and makes N timed write(2)s of SIZE bytes to /dev/null; the parent takes the
 * listener (SCM_RIGHTS), sets SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP where the
 * kernel has it (6.6+), and answers each notification with CONTINUE from a
 * blocking NOTIF_RECV - the loop testbed's relay runs in Python.  Latencies
 * (ns, u32) go to OUT; "sync_wakeup=0|1" is printed on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

static inline uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int full(int fd, void *buf, size_t len, int out)
{
	char *p = buf;

	while (len) {
		ssize_t r = out ? send(fd, p, len, 0) : recv(fd, p, len, 0);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

static void child(int sock, long n, size_t size)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_write, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof(f) / sizeof(f[0]), .filter = f };
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	char go = 0;
	struct iovec iov = { .iov_base = &go, .iov_len = 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	int null = open("/dev/null", O_WRONLY);
	char *buf = calloc(1, size ? size : 1);
	uint32_t *lat = malloc((size_t)n * sizeof(*lat));

	if (null < 0 || !buf || !lat || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		_exit(3);
	int lfd = (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER,
			       SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (lfd < 0)
		_exit(4);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &lfd, sizeof(int));
	if (sendmsg(sock, &mh, 0) != 1 || full(sock, &go, 1, 0))
		_exit(5);
	close(lfd);
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();

		if (write(null, buf, size) < 0)
			_exit(6);
		lat[i] = (uint32_t)(now_ns() - t0);
	}
	_exit(full(sock, lat, (size_t)n * sizeof(*lat), 1) ? 7 : 0);
}

int main(int argc, char **argv)
{
	int sv[2], status, lfd, sync = 0;

	if (argc != 4)
		return 2;
	long n = atol(argv[1]);
	uint32_t *lat = malloc((size_t)n * sizeof(*lat));

	if (!lat || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return 3;
	pid_t pid = fork();

	if (pid == 0) {
		close(sv[0]);
		child(sv[1], n, (size_t)atol(argv[2]));
	}
	close(sv[1]);
	char cbuf[CMSG_SPACE(sizeof(int))], go;
	struct iovec iov = { .iov_base = &go, .iov_len = 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	if (recvmsg(sv[0], &mh, 0) != 1 || !CMSG_FIRSTHDR(&mh))
		return 4;
	memcpy(&lfd, CMSG_DATA(CMSG_FIRSTHDR(&mh)), sizeof(int));
	if (ioctl(lfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) == 0)
		sync = 1;
	if (full(sv[0], &go, 1, 1))
		return 5;
	struct seccomp_notif req;
	struct seccomp_notif_resp resp;

	for (long i = 0; i < n; i++) {
		memset(&req, 0, sizeof(req));
		if (ioctl(lfd, SECCOMP_IOCTL_NOTIF_RECV, &req)) {
			if (errno == EINTR || errno == ENOENT) {
				i--;
				continue;
			}
			return 6;
		}
		resp.id = req.id;
		resp.val = 0;
		resp.error = 0;
		resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
		if (ioctl(lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp) && errno != ENOENT)
			return 7;
	}
	if (full(sv[0], lat, (size_t)n * sizeof(*lat), 0) || waitpid(pid, &status, 0) != pid ||
	    !WIFEXITED(status) || WEXITSTATUS(status))
		return 8;
	FILE *f = fopen(argv[3], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n, f) != (size_t)n || fclose(f))
		return 9;
	printf("sync_wakeup=%d\n", sync);
	return 0;
}

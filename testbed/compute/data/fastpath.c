/*
 * fastpath.c: the relay's common case in C (testbed/fastpath.py loads it).
 *
 * tb_forward() serves cost-mode calls of the seccomp backend while nothing
 * else is in flight, exactly as testbed.relay.Relay does in Python: blocking
 * SECCOMP_IOCTL_NOTIF_RECV, one pread of the call's single input buffer from
 * /proc/TID/mem, the fixed-width CALL frame of docs/wire.md, zmq_send on the
 * relay's own DEALER (pyzmq's socket handle), a wait for the reply (zmq_poll
 * on the socket and the listener, sleeping or spinning), the fixed-width
 * RESULT, NOTIF_SEND CONTINUE, and one calls.bin record (docs/rundir.md) in a
 * buffer the Python recorder drains.  Everything else returns to Python with
 * the notification (and the call, the frame or the reply) in hand; see the
 * TB_* codes.  libzmq is called through pointers taken from the library pyzmq
 * itself loaded: a socket handle belongs to one copy of libzmq.
 *
 * Offload mode (offload = 1, testbed.compute.offload.OffloadRelay): the data
 * calls on placeholder fds (read write pread64 pwrite64 readv writev preadv
 * pwritev lseek fstat, newfstatat(fd, "", AT_EMPTY_PATH)) are served here as
 * the Python path serves them (see "Offload" below); the same calls on local
 * fds are continued here; everything else, and every case this code does not
 * reproduce exactly, goes back to Python.
 *
 * shm:// (cost mode, testbed.core.shmring): the same CALL and RESULT bytes
 * go through the shared-memory rings instead of a socket (see "shm://"
 * below).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define TB_ABI 6

/* struct seccomp_notif / seccomp_notif_resp (linux/seccomp.h, stable ABI) */
#define NOTIF_SIZE 80
#define IOC_RECV ((3u << 30) | (80u << 16) | ('!' << 8) | 0)
#define IOC_SEND ((3u << 30) | (24u << 16) | ('!' << 8) | 1)
#define IOC_ID_VALID ((1u << 30) | (8u << 16) | ('!' << 8) | 2)
#define FLAG_CONTINUE 1u

#define ZMQ_DONTWAIT 1
#define ZMQ_POLLIN 1
typedef struct {
	void *socket;
	int fd;
	short events;
	short revents;
} zmq_pollitem_t;
typedef struct {
	unsigned char _[64] __attribute__((aligned(8)));
} zmq_msg_t;

#define TB_NR_MAX 512
#define TB_CAP 4096          /* records buffered before Python drains them */
#define TB_MAX_BUFFER (1 << 20) /* syscalls.MAX_BUFFER */
#define TB_MEMFDS 256
#define CALL_FIX 80
#define BUF_HEAD 7
#define RESULT_SIZE 68
#define TB_RCAP ((1 << 20) + (1 << 16)) /* raw ZMTP: bytes read ahead (a whole 1 MiB reply fits) */
#define OUT_HEAD 16         /* room for a ZMTP frame header before the CALL */
#define TB_MAP 16384        /* placeholder slots (Python falls back beyond TB_MAP / 2) */
#define TB_IOV_MAX 1024
#define RA_MAX 8              /* reads in flight ahead, at most */
#define RA_BYTES (4 << 20)    /* ... and bytes (the delegate allows 8 MiB in flight) */
#define RA_NO 16              /* handles read-ahead gave up on (a ring) */
#define F_AHEAD 64            /* rundir.F_AHEAD: served from a read sent ahead */

/* flags of a record (testbed.rundir) */
#define F_CALLER_GONE 4

enum {
	TB_ERROR = -1,   /* NOTIF_RECV failed: errno in err */
	TB_NONE = 0,     /* nothing in hand (EINTR, caller gone), or the time slice ended */
	TB_FULL = 1,     /* the record buffer is full: drain and call again */
	TB_TRAP = 2,     /* a notification Python serves (notif, t_trap); nothing sent */
	TB_INFLIGHT = 3, /* the call was sent; Python waits for its reply */
	TB_FRAME = 4,    /* as TB_INFLIGHT, and a frame Python decodes (frame, frame_len) */
	TB_REPLY = 5,    /* its RESULT arrived but NOTIF_SEND failed: Python releases it */
};

typedef int (*zmq_send_f)(void *, const void *, size_t, int);
typedef int (*zmq_poll_f)(zmq_pollitem_t *, int, long);
typedef int (*zmq_msg_init_f)(zmq_msg_t *);
typedef int (*zmq_msg_recv_f)(zmq_msg_t *, void *, int);
typedef void *(*zmq_msg_data_f)(zmq_msg_t *);
typedef size_t (*zmq_msg_size_f)(const zmq_msg_t *);
typedef int (*zmq_msg_more_f)(const zmq_msg_t *);
typedef int (*zmq_msg_close_f)(zmq_msg_t *);

/* One calls.bin record (rundir.CALL_DTYPE: 96 bytes, little-endian). */
struct tb_record {
	uint64_t seq;
	int32_t tid;
	int16_t nr;
	uint16_t flags;
	int64_t ret;
	uint32_t bytes_in, bytes_out;
	int64_t t_trap, t_send, t_reply, t_resume;
	int64_t d_recv, d_exec_start, d_exec_end, d_send;
};

/* Shared with Python (testbed/fastpath.py mirrors it field by field). */
struct tb_ctx {
	/* set once by Python */
	int64_t abi, listener, busy, wait_ns, slice_ns, stages, trap_only;
	void *sock;
	zmq_send_f zsend;
	zmq_poll_f zpoll;
	zmq_msg_init_f zinit;
	zmq_msg_recv_f zrecv;
	zmq_msg_data_f zdata;
	zmq_msg_size_f zsize;
	zmq_msg_more_f zmore;
	zmq_msg_close_f zclose;
	/* shared state */
	uint64_t next_id, seq;
	int64_t nrec, served, caller_gone, err;
	/* the call in hand after TB_TRAP .. TB_REPLY */
	int64_t t_trap, t_send, t_reply, t_sent, nbytes, ret;
	uint64_t call_id;
	int64_t stamps[4];
	void *frame;
	int64_t frame_len;
	uint8_t notif[NOTIF_SIZE];
	/*
	 * Raw ZMTP (testbed.zmtp.Dealer): raw_fd >= 0 replaces the libzmq socket.
	 * Python hands over with nothing buffered on its side; on return it takes
	 * rbuf[rpos..rlen) (bytes read past the reply), out[tail_off..+tail_len)
	 * (a CALL the kernel took only in part) and raw_err (the connection
	 * failed: -1 closed by the peer, else errno).
	 */
	int64_t raw_fd, raw_err, rpos, rlen, tail_off, tail_len;
	uint8_t *rbuf, *outp;
	/*
	 * Offload (set by Python: offload, pipe_dev, devnull).  Counters Python
	 * drains: o_local (continued locally), o_remote (sent).  The call in hand
	 * after TB_INFLIGHT/TB_FRAME: its handle, the bytes it may return or was
	 * given (o_want), its output segments (tb_segs: o_nsegs (addr, len) pairs).
	 */
	int64_t offload, pipe_dev, devnull, o_local, o_remote, o_handle, o_want, o_nsegs, o_nmap;
	/*
	 * shm:// (testbed.core.shmring.Dealer): shm_base != NULL replaces the
	 * socket.  Python hands over the mapping (base, ring size, both checked
	 * when it was mapped), the two doorbells, the control socket, the spin
	 * before sleeping (shm_spin_ns; busy spins to the slice's end) and its own
	 * indices (shm_tx: the request ring's head, shm_rx: the reply ring's
	 * tail), and takes the indices back.  shm_bad: a peer's index or record
	 * was out of bounds (nothing was used: Python's ring code finds it again
	 * and drops the connection with its one-line error).
	 */
	uint8_t *shm_base;
	int64_t shm_size, shm_req_bell, shm_rep_bell, shm_ctl, shm_spin_ns, shm_bad;
	uint64_t shm_tx, shm_rx;
	/*
	 * Kind 3 (watched, testbed.compute.interpose.WATCHED): continued at once and
	 * counted here, never sent nor recorded: io_uring_setup, io_uring_enter, file
	 * mmap, writable MAP_SHARED file mmap (interpose.WATCH_KEYS).  Python drains them.
	 */
	int64_t watched[4];
	/*
	 * Offload read-ahead (--offload-read-ahead N, docs/offload.md): ra_depth
	 * reads in flight ahead of a program reading one placeholder sequentially
	 * (0: off), waited for up to ra_timeout_ns each.  ra_lost: a read-ahead
	 * reply never came or was invalid (Python takes the delegate as lost).
	 * Counters Python drains: reads sent ahead, program reads served from them,
	 * reads sent ahead and never used, their bytes moved back (lseek), lseeks.
	 */
	int64_t ra_depth, ra_timeout_ns, ra_lost, ra_issued, ra_served, ra_wasted, ra_undone,
		ra_lseeks;
	/*
	 * A read or pread above chunk bytes (0: never) is sent as several reads of
	 * at most chunk bytes at once, each written into the caller as it comes
	 * (o_chunked counts them).  Python sets it only for a delegate that runs a
	 * connection's calls in order (--workers 1).
	 */
	int64_t chunk, o_chunked;
	/* private */
	int8_t kind[TB_NR_MAX], buf_arg[TB_NR_MAX], size_arg[TB_NR_MAX];
	int32_t mem_tid[TB_MEMFDS], mem_fd[TB_MEMFDS];
	zmq_msg_t msg;
	int msg_open;
	struct tb_record rec[TB_CAP];
	int64_t stage[TB_CAP][3];
	uint8_t out[OUT_HEAD + CALL_FIX + BUF_HEAD + TB_MAX_BUFFER + 16];
	uint8_t rb[TB_RCAP];
	/* offload: placeholder pipe inode -> remote handle (open addressing) */
	uint64_t map_ino[TB_MAP];
	int64_t map_h[TB_MAP];
	int8_t okind[TB_NR_MAX];
	uint64_t segs[2 * TB_IOV_MAX];
	uint8_t iovs[16 * TB_IOV_MAX];
	int64_t lowat; /* raw ZMTP: the SO_RCVLOWAT set */
	int32_t fdd_tid[TB_MEMFDS], fdd_fd[TB_MEMFDS]; /* /proc/TID/fd directories, by tid */
	/* read-ahead: one stream (a ring of slots), the run detector, refused handles */
	struct ra_slot {
		uint64_t id;
		int64_t want, ret, err, t_send, t_reply, stamps[4];
		int ready, held; /* held: data points into the frame in hand (not copied) */
		const uint8_t *data;
		uint8_t *buf;
		size_t cap;
	} ra[RA_MAX];
	int ra_head, ra_n, ra_eof, ra_run, ra_quiet, ra_no_next, ra_strikes;
	int64_t ra_handle, ra_want, ra_last, ra_last_want, ra_strike_h;
	int64_t ra_no[RA_NO];
};

static inline int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline uint8_t *be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
	return p + 8;
}

static inline uint64_t rd64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = (v << 8) | p[i];
	return v;
}

struct tb_ctx *tb_new(void)
{
	struct tb_ctx *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->abi = TB_ABI;
	c->next_id = 1;
	c->raw_fd = -1;
	c->lowat = 1;
	c->rbuf = c->rb;
	c->outp = c->out;
	for (int i = 0; i < TB_MEMFDS; i++)
		c->mem_fd[i] = c->fdd_fd[i] = -1;
	c->ra_handle = c->ra_last = c->ra_strike_h = -1;
	for (int i = 0; i < RA_NO; i++)
		c->ra_no[i] = -1;
	return c;
}

/*
 * kind 0: not served here; 1: no input buffer; 2: one buffer at buf_arg, length in
 * size_arg; 3: watched (continue at once, count in watched[])
 */
int tb_set_kind(struct tb_ctx *c, int nr, int kind, int buf_arg, int size_arg)
{
	if (nr < 0 || nr >= TB_NR_MAX || kind < 0 || kind > 3 || buf_arg < 0 || buf_arg > 5 ||
	    size_arg < 0 || size_arg > 5)
		return -1;
	c->kind[nr] = (int8_t)kind;
	c->buf_arg[nr] = (int8_t)buf_arg;
	c->size_arg[nr] = (int8_t)size_arg;
	return 0;
}

void *tb_records(struct tb_ctx *c)
{
	return c->rec;
}

void *tb_stages(struct tb_ctx *c)
{
	return c->stage;
}

size_t tb_ctx_size(void)
{
	return sizeof(struct tb_ctx);
}

size_t tb_hdr_size(void)
{
	return offsetof(struct tb_ctx, kind);
}

/* testbed.compute.interpose.count_watched: x86-64 numbers, mmap(2) prot/flags bits */
static void count_watched(struct tb_ctx *c, int32_t nr, const uint64_t *args)
{
	if (nr == 425) { /* io_uring_setup */
		c->watched[0]++;
	} else if (nr == 426) { /* io_uring_enter */
		c->watched[1]++;
	} else if (nr == 9) { /* mmap (file-backed: the filter lets only those trap) */
		uint64_t type = args[3] & 0x0f;

		c->watched[2]++;
		if ((args[2] & 0x2) && (type == 0x01 || type == 0x03))
			c->watched[3]++;
	}
}

static void forget_mem(struct tb_ctx *c, int32_t tid)
{
	int i = (uint32_t)tid % TB_MEMFDS;

	if (c->mem_fd[i] >= 0 && c->mem_tid[i] == tid) {
		close(c->mem_fd[i]);
		c->mem_fd[i] = -1;
	}
}

static int mem_fd(struct tb_ctx *c, int32_t tid)
{
	int i = (uint32_t)tid % TB_MEMFDS;
	char path[32];

	if (c->mem_fd[i] >= 0) {
		if (c->mem_tid[i] == tid)
			return c->mem_fd[i];
		close(c->mem_fd[i]);
		c->mem_fd[i] = -1;
	}
	snprintf(path, sizeof(path), "/proc/%d/mem", tid);
	c->mem_fd[i] = open(path, O_RDONLY | O_CLOEXEC);
	c->mem_tid[i] = tid;
	return c->mem_fd[i];
}

/* The fixed-width CALL header (wire.encode_call_fields); returns its length. */
static size_t call_head(uint8_t *p, uint64_t id, uint32_t tid, uint16_t nr, const uint64_t *args,
			int nbufs)
{
	static const uint8_t prefix[7] = {0x98, 0x02, 0xa4, 'c', 'a', 'l', 'l'};
	uint8_t *q = p;

	memcpy(q, prefix, 7);
	q += 7;
	*q++ = 0xcf;
	q = be64(q, id);
	*q++ = 0xce;
	*q++ = (uint8_t)(tid >> 24);
	*q++ = (uint8_t)(tid >> 16);
	*q++ = (uint8_t)(tid >> 8);
	*q++ = (uint8_t)tid;
	*q++ = 0xcd;
	*q++ = (uint8_t)(nr >> 8);
	*q++ = (uint8_t)nr;
	*q++ = 0x96;
	for (int i = 0; i < 6; i++) {
		*q++ = 0xcf;
		q = be64(q, args[i]);
	}
	*q++ = nbufs ? 0x91 : 0x90;
	return (size_t)(q - p);
}

static size_t buf_head(uint8_t *p, int arg, uint32_t len)
{
	p[0] = 0x92;
	p[1] = (uint8_t)arg;
	p[2] = 0xc6;
	p[3] = (uint8_t)(len >> 24);
	p[4] = (uint8_t)(len >> 16);
	p[5] = (uint8_t)(len >> 8);
	p[6] = (uint8_t)len;
	return BUF_HEAD;
}

/* Test hook: the frame tb_forward would send (tests compare it with wire.py's). */
size_t tb_encode_call(uint8_t *out, uint64_t id, uint32_t tid, uint16_t nr, const uint64_t *args,
		      int arg, const uint8_t *data, uint32_t len)
{
	size_t n = call_head(out, id, tid, nr, args, arg >= 0);

	if (arg >= 0) {
		n += buf_head(out + n, arg, len);
		memcpy(out + n, data, len);
		n += len;
	}
	memcpy(out + n, "\xa4" "cost", 5);
	return n + 5;
}

/*
 * The fixed-width RESULT for call id (wire._decode_result_fixed): 1 and
 * ret/stamps filled, or 0 (then Python decodes the frame).
 */
int tb_parse_result(const uint8_t *f, size_t n, uint64_t id, int64_t *ret, int64_t *stamps)
{
	static const uint8_t prefix[9] = {0x97, 0x02, 0xa6, 'r', 'e', 's', 'u', 'l', 't'};

	if (n != RESULT_SIZE || memcmp(f, prefix, 9) || f[9] != 0xcf || f[18] != 0xd3 ||
	    f[27] != 0xcd || f[30] != 0x94 || f[67] != 0x90)
		return 0;
	if (rd64(f + 10) != id || ((f[28] << 8) | f[29]) > 4095)
		return 0;
	for (int i = 0; i < 4; i++) {
		const uint8_t *s = f + 31 + 9 * i;

		if (s[0] != 0xcf || (s[1] & 0x80))
			return 0;
		stamps[i] = (int64_t)rd64(s + 1);
	}
	*ret = (int64_t)rd64(f + 19);
	return 1;
}

void tb_frame_done(struct tb_ctx *c)
{
	if (c->msg_open) {
		c->zclose(&c->msg);
		c->msg_open = 0;
	}
	c->frame = NULL;
	c->frame_len = 0;
}

/* NOTIF_SEND CONTINUE: 0 sent, 1 caller gone, -1 another error (errno). */
static int resume(struct tb_ctx *c, uint64_t nid)
{
	struct {
		uint64_t id;
		int64_t val;
		int32_t error;
		uint32_t flags;
	} resp = {nid, 0, 0, FLAG_CONTINUE};

	for (int i = 0; i < 100; i++) {
		if (ioctl((int)c->listener, IOC_SEND, &resp) == 0)
			return 0;
		if (errno == ENOENT)
			return 1;
		if (errno != EINTR)
			return -1;
	}
	return -1;
}

/*
 * Raw ZMTP: the next message part buffered in rbuf (commands skipped) into
 * frame/frame_len, 1 (*more set); 0: incomplete; -1: a part too large for
 * rbuf (Python reads it).
 */
static int raw_part(struct tb_ctx *c, int *more)
{
	for (;;) {
		uint8_t *p = c->rbuf + c->rpos;
		int64_t avail = c->rlen - c->rpos;
		uint64_t size;
		int64_t head = 2;

		if (avail < 2)
			return 0;
		size = p[1];
		if (p[0] & 0x02) {
			if (avail < 9)
				return 0;
			size = rd64(p + 1);
			head = 9;
		}
		if (size > TB_RCAP - 9)
			return -1;
		if ((uint64_t)avail < (uint64_t)head + size)
			return 0;
		c->rpos += head + (int64_t)size;
		if (p[0] & 0x04)
			continue; /* a command: skipped (the delegate sends none after READY) */
		c->frame = p + head;
		c->frame_len = (int64_t)size;
		*more = p[0] & 0x01;
		return 1;
	}
}

/* Bytes still missing of the part whose header is buffered (0: none, or small). */
static int64_t raw_need(struct tb_ctx *c)
{
	uint8_t *p = c->rbuf + c->rpos;
	int64_t avail = c->rlen - c->rpos, head = 2, size;

	if (avail < 9 || !(p[0] & 0x02) || (p[0] & 0x04))
		return 1;
	size = (int64_t)rd64(p + 1);
	if (size > TB_RCAP - 9 || head + 7 + size - avail < (64 << 10))
		return 1;
	return head + 7 + size - avail;
}

/*
 * SO_RCVLOWAT on the raw connection: poll reports it readable once n bytes
 * are queued (the kernel grows the receive buffer to hold them), so a large
 * reply costs one wake-up, not one per segment.  1 is the default Python sees.
 */
static void raw_lowat(struct tb_ctx *c, int64_t n)
{
	int v = (int)n, domain = 0;
	socklen_t len = sizeof(domain);

	if (n == c->lowat || c->raw_fd < 0)
		return;
	if (n > 1 && (getsockopt((int)c->raw_fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) ||
		      domain != AF_INET))
		return; /* TCP only (ipc://: poll does not wait for it, nothing gained) */
	if (setsockopt((int)c->raw_fd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof(v)) == 0 || n == 1)
		c->lowat = n;
}

/* Raw ZMTP: wait (poll, or spin with timeout 0) for the next part; as wait_reply's loop. */
static int raw_wait_part(struct tb_ctx *c, int64_t until, int *more)
{
	struct pollfd items[2] = {{(int)c->raw_fd, POLLIN, 0}, {(int)c->listener, POLLIN, 0}};
	int64_t deadline = c->t_send + c->wait_ns;

	for (;;) {
		int got = raw_part(c, more);

		if (got > 0)
			return TB_NONE;
		if (got < 0)
			return TB_INFLIGHT;
		if (c->offload)
			raw_lowat(c, raw_need(c)); /* a large part: wake once it is all here */
		if (c->rpos == c->rlen) {
			c->rpos = c->rlen = 0;
		} else if (c->rlen == TB_RCAP) {
			memmove(c->rbuf, c->rbuf + c->rpos, (size_t)(c->rlen - c->rpos));
			c->rlen -= c->rpos;
			c->rpos = 0;
		}
		int ms = 0;

		if (!c->busy) {
			int64_t left = deadline - now_ns();

			if (left <= 0)
				return TB_INFLIGHT;
			ms = (int)(left / 1000000) + 1;
		}
		int rc = poll(items, c->ra_quiet ? 1 : 2, ms);

		if (rc < 0)
			return TB_INFLIGHT;
		if (rc == 0) {
			int64_t now = now_ns();

			if (!c->busy || now >= deadline || now >= until)
				return TB_INFLIGHT;
			sched_yield(); /* spinning: let a peer woken on this CPU run (the delegate) */
			continue;
		}
		if (items[0].revents) {
			ssize_t r = recv((int)c->raw_fd, c->rbuf + c->rlen, (size_t)(TB_RCAP - c->rlen),
					 MSG_DONTWAIT);

			if (r > 0) {
				c->rlen += r;
				continue;
			}
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			c->raw_err = r == 0 ? -1 : errno;
			return TB_INFLIGHT;
		}
		return TB_INFLIGHT; /* the listener: another call is pending */
	}
}

/* raw_wait_part, the receive low-water mark back at 1 whatever it returns. */
static int raw_wait(struct tb_ctx *c, int64_t until, int *more)
{
	int rc = raw_wait_part(c, until, more);

	raw_lowat(c, 1);
	return rc;
}

/* ------------------------------------------------------------------ shm://
 *
 * The relay's end of testbed.core.shmring (docs/wire.md, "Shared memory"):
 * records of a little-endian u32 length and one wire message in a byte
 * stream wrapping at the ring's end; u64 indices counting bytes.  Each side
 * keeps its own index (here shm_tx, shm_rx) and only stores it; the peer's
 * is read once, checked (0 <= used <= ring size, a record's length within
 * what was published) and every access is taken modulo the ring size, so
 * nothing a peer writes makes this code touch memory outside the mapping.
 * Doorbells: a consumer about to sleep stores 1 in its waiting flag, makes a
 * full fence and looks again; a producer makes a full fence after its put
 * and writes the eventfd only if the consumer's flag is set.
 */
#define SHM_HEADER 4096
#define SHM_REQ_HEAD 64
#define SHM_REQ_TAIL 192
#define SHM_REQ_WAIT 576
#define SHM_REP_HEAD 320
#define SHM_REP_TAIL 448
#define SHM_REP_WAIT 704

static inline uint64_t *shm_word(struct tb_ctx *c, int off)
{
	return (uint64_t *)(void *)(c->shm_base + off);
}

static void shm_copy_in(uint8_t *ring, uint64_t size, uint64_t pos, const uint8_t *p, size_t n)
{
	size_t first = (uint64_t)n < size - pos ? n : (size_t)(size - pos);

	memcpy(ring + pos, p, first);
	if (first < n)
		memcpy(ring, p + first, n - first);
}

static void shm_copy_out(const uint8_t *ring, uint64_t size, uint64_t pos, uint8_t *p, size_t n)
{
	size_t first = (uint64_t)n < size - pos ? n : (size_t)(size - pos);

	memcpy(p, ring + pos, first);
	if (first < n)
		memcpy(p + first, ring, n - first);
}

/* Put p[0..n) in the request ring, ringing the bell if the delegate sleeps: 0, or -1 (no room, or shm_bad). */
static int shm_put(struct tb_ctx *c, const uint8_t *p, size_t n)
{
	uint64_t size = (uint64_t)c->shm_size, need = 4 + (uint64_t)n, pos;
	uint64_t used = c->shm_tx - __atomic_load_n(shm_word(c, SHM_REQ_TAIL), __ATOMIC_ACQUIRE);
	uint8_t *ring = c->shm_base + SHM_HEADER;
	uint8_t len[4] = {(uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};

	if (used > size) {
		c->shm_bad = 1;
		return -1;
	}
	if (need > size - used)
		return -1; /* full (or too large): Python's path decides */
	pos = c->shm_tx % size;
	shm_copy_in(ring, size, pos, len, 4);
	shm_copy_in(ring, size, (pos + 4) % size, p, n);
	c->shm_tx += need;
	__atomic_store_n(shm_word(c, SHM_REQ_HEAD), c->shm_tx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(shm_word(c, SHM_REQ_WAIT), __ATOMIC_RELAXED)) {
		uint64_t one = 1;
		ssize_t w = write((int)c->shm_req_bell, &one, 8);

		(void)w; /* EAGAIN: the counter is full, a wake-up is pending anyway */
	}
	return 0;
}

/* The next reply record: 1 (*len its length, checked), 0 none, -1 out of bounds (shm_bad). */
static int shm_peek(struct tb_ctx *c, uint32_t *len)
{
	uint64_t size = (uint64_t)c->shm_size;
	uint64_t used = __atomic_load_n(shm_word(c, SHM_REP_HEAD), __ATOMIC_ACQUIRE) - c->shm_rx;
	uint8_t b[4];
	uint32_t n;

	if (!used)
		return 0;
	if (used > size || used < 4) {
		c->shm_bad = 1;
		return -1;
	}
	shm_copy_out(c->shm_base + SHM_HEADER + size, size, c->shm_rx % size, b, 4);
	n = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
	if ((uint64_t)n > size - 4 || 4 + (uint64_t)n > used) {
		c->shm_bad = 1;
		return -1;
	}
	*len = n;
	return 1;
}

/*
 * Wait for the reply to call_id on the reply ring (spinning until spin_end,
 * then armed on the bell, the listener and the control socket): TB_NONE with
 * its fixed RESULT parsed and taken off the ring; TB_INFLIGHT otherwise (any
 * other record stays in the ring for Python, a bad index, the listener, the
 * control socket, the deadline, the slice's end while spinning).
 */
static int shm_wait(struct tb_ctx *c, int64_t until)
{
	struct pollfd items[3] = {{(int)c->shm_rep_bell, POLLIN, 0}, {(int)c->listener, POLLIN, 0},
				  {(int)c->shm_ctl, POLLIN, 0}};
	uint64_t size = (uint64_t)c->shm_size;
	uint8_t *ring = c->shm_base + SHM_HEADER + size;
	int64_t deadline = c->t_send + c->wait_ns;
	int64_t spin_end = c->busy ? until : c->t_send + c->shm_spin_ns;
	uint32_t n = 0;

	for (long i = 0;; i++) {
		int got = shm_peek(c, &n);

		if (got < 0)
			return TB_INFLIGHT;
		if (got > 0) {
			if (n != RESULT_SIZE)
				return TB_INFLIGHT; /* Python takes it (Relay.on_frame) */
			shm_copy_out(ring, size, (c->shm_rx + 4) % size, c->rb, RESULT_SIZE);
			if (!tb_parse_result(c->rb, RESULT_SIZE, c->call_id, &c->ret, c->stamps))
				return TB_INFLIGHT; /* left in the ring: Python decodes it */
			c->t_reply = now_ns();
			c->shm_rx += 4 + RESULT_SIZE;
			__atomic_store_n(shm_word(c, SHM_REP_TAIL), c->shm_rx, __ATOMIC_RELEASE);
			return TB_NONE;
		}
		int64_t now = now_ns();

		if (now >= deadline || (c->busy && now >= until))
			return TB_INFLIGHT;
		if (now < spin_end) {
			if ((i & 255) == 255) { /* now and then: another call, a dead peer; let others run */
				if (poll(items + 1, 2, 0) != 0)
					return TB_INFLIGHT;
				sched_yield();
			} else {
				__builtin_ia32_pause();
			}
			continue;
		}
		__atomic_store_n(shm_word(c, SHM_REP_WAIT), 1, __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		got = shm_peek(c, &n);
		if (got) {
			__atomic_store_n(shm_word(c, SHM_REP_WAIT), 0, __ATOMIC_RELAXED);
			continue;
		}
		int rc = poll(items, 3, (int)((deadline - now) / 1000000) + 1);

		__atomic_store_n(shm_word(c, SHM_REP_WAIT), 0, __ATOMIC_RELAXED);
		if (rc < 0)
			return TB_INFLIGHT; /* EINTR: Python's signal handlers run, it waits on */
		if (items[0].revents) {
			uint64_t v;
			ssize_t r = read((int)c->shm_rep_bell, &v, 8);

			(void)r;
		}
		if ((items[1].revents || items[2].revents) && shm_peek(c, &n) == 0)
			return TB_INFLIGHT; /* another call, or the control socket: Python looks */
	}
}

/* Test hook: put p[0..n) as the relay would; 0, or -1 (no room / bad index: *bad). */
int tb_shm_put(struct tb_ctx *c, const uint8_t *p, size_t n)
{
	return shm_put(c, p, n);
}

/* Test hook: the next record's length (>= 0), -1 none, -2 out of bounds. */
int64_t tb_shm_peek(struct tb_ctx *c)
{
	uint32_t n = 0;
	int got = shm_peek(c, &n);

	return got > 0 ? (int64_t)n : got == 0 ? -1 : -2;
}

/* Wait for the reply to call_id; TB_NONE once it is released and recorded. */
static int wait_reply(struct tb_ctx *c, uint64_t nid, int32_t tid, int16_t nr, int64_t until)
{
	zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {NULL, (int)c->listener, ZMQ_POLLIN, 0}};
	int64_t deadline = c->t_send + c->wait_ns;
	int64_t t_decoded;
	int rc;

	if (c->shm_base) {
		rc = shm_wait(c, until);
		if (rc != TB_NONE)
			return rc;
		goto parsed;
	}
	if (c->raw_fd >= 0) {
		int more = 0;

		rc = raw_wait(c, until, &more);
		if (rc != TB_NONE)
			return rc;
		c->t_reply = now_ns();
		if (more ||
		    !tb_parse_result(c->frame, (size_t)c->frame_len, c->call_id, &c->ret, c->stamps))
			return TB_FRAME;
		goto parsed;
	}
	for (;;) {
		long ms = 0;

		if (!c->busy) {
			int64_t left = deadline - now_ns();

			if (left <= 0)
				return TB_INFLIGHT;
			ms = (long)(left / 1000000) + 1;
		}
		rc = c->zpoll(items, 2, ms);
		if (rc < 0)
			return TB_INFLIGHT; /* EINTR: Python's signal handlers run, it waits on */
		if (rc == 0) {
			int64_t now = now_ns();

			/* spinning: back to Python at the slice's end too (signals) */
			if (!c->busy || now >= deadline || now >= until)
				return TB_INFLIGHT;
			sched_yield(); /* let a peer woken on this CPU run (the delegate) */
			continue;
		}
		if (items[0].revents & ZMQ_POLLIN) {
			c->zinit(&c->msg);
			if (c->zrecv(&c->msg, c->sock, ZMQ_DONTWAIT) < 0) {
				c->zclose(&c->msg);
				continue; /* spurious */
			}
			c->msg_open = 1;
			c->t_reply = now_ns();
			break;
		}
		return TB_INFLIGHT; /* the listener: another call is pending */
	}
	c->frame = c->zdata(&c->msg);
	c->frame_len = (int64_t)c->zsize(&c->msg);
	if (c->zmore(&c->msg) ||
	    !tb_parse_result(c->frame, (size_t)c->frame_len, c->call_id, &c->ret, c->stamps))
		return TB_FRAME;
parsed:
	t_decoded = now_ns();
	tb_frame_done(c);
	rc = resume(c, nid);
	if (rc < 0)
		return TB_REPLY;
	struct tb_record *r = &c->rec[c->nrec];
	int64_t t_resume = now_ns();

	r->seq = c->seq + (uint64_t)c->nrec;
	r->tid = tid;
	r->nr = nr;
	r->flags = rc ? F_CALLER_GONE : 0;
	r->ret = c->ret;
	r->bytes_in = (uint32_t)c->nbytes;
	r->bytes_out = 0;
	r->t_trap = c->t_trap;
	r->t_send = c->t_send;
	r->t_reply = c->t_reply;
	r->t_resume = t_resume;
	r->d_recv = c->stamps[0];
	r->d_exec_start = c->stamps[1];
	r->d_exec_end = c->stamps[2];
	r->d_send = c->stamps[3];
	if (c->stages) {
		c->stage[c->nrec][0] = c->t_sent;
		c->stage[c->nrec][1] = t_decoded;
		c->stage[c->nrec][2] = now_ns();
	}
	c->nrec++;
	c->served++;
	c->caller_gone += rc;
	return TB_NONE;
}

/*
 * Raw ZMTP: send the message out[0..n) as one frame (its header goes in the
 * OUT_HEAD bytes before out).  0: all sent; 1: in part (tail_off/tail_len);
 * -1: nothing sent (EAGAIN, or an error in raw_err).
 */
static int raw_send(struct tb_ctx *c, uint8_t *out, size_t n)
{
	uint8_t *h;

	if (n > 255) {
		h = out - 9;
		h[0] = 0x02;
		be64(h + 1, n);
	} else {
		h = out - 2;
		h[0] = 0;
		h[1] = (uint8_t)n;
	}
	size_t total = n + (size_t)(out - h);
	ssize_t w;

	do
		w = send((int)c->raw_fd, h, total, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (w < 0 && errno == EINTR);
	if (w <= 0) {
		if (w < 0 && errno != EAGAIN)
			c->raw_err = errno;
		return -1;
	}
	if ((size_t)w == total)
		return 0;
	c->tail_off = (h - c->out) + w;
	c->tail_len = (int64_t)total - w;
	return 1;
}

/* ------------------------------------------------------------------ Offload
 *
 * The data calls of testbed.compute.offload.OffloadRelay, step for step as
 * its Python path makes them (_decide, _marshal_data, _iovecs, _send_pending,
 * on_frame, _invalid, _complete):
 *
 *  - the fd argument is a placeholder if /proc/TID/fd/N is a FIFO of pipefs
 *    whose inode Python registered (tb_map_set); else the call continues
 *    locally (NOTIF_SEND CONTINUE, o_local);
 *  - the caller's buffer or iovecs are judged by the same read/write/writev
 *    on /dev/null (the errno goes in args[1], the total in args[2]), input
 *    bytes are read with process_vm_readv straight into the outgoing CALL;
 *  - NOTIF_ID_VALID, then the fixed-width CALL with mode "offload";
 *  - the RESULT (any msgpack encoding of the layouts below) is checked as
 *    _invalid checks it, output bytes go into the caller with
 *    process_vm_writev straight from the received frame after ID_VALID.
 *
 * Every case this code does not reproduce exactly goes back to Python: before
 * anything is sent as TB_TRAP (Python makes the whole call again), after as
 * TB_INFLIGHT/TB_FRAME with the call's Pending in hand (o_handle, o_want,
 * segs): a reply that is another call's, malformed, invalid or not the
 * fixed-width one expected, an output that did not land whole (Python writes
 * it again, identically, and moves the remote offset back), a failed
 * process_vm_readv other than EFAULT, a send the socket did not take.
 */
enum {
	OK_READ = 1, OK_PREAD, OK_READV, OK_PREADV,
	OK_WRITE, OK_PWRITE, OK_WRITEV, OK_PWRITEV,
	OK_LSEEK, OK_FSTAT, OK_FSTATAT,
};
#define OFF_NEXT 100 /* served (or continued): take the next notification */
#define STAT_SIZE 144
#define AT_EMPTY_PATH 0x1000
#define MAX_OUTS 6

static inline int ok_read(int k) { return k >= OK_READ && k <= OK_PREADV; }
static inline int ok_write(int k) { return k >= OK_WRITE && k <= OK_PWRITEV; }
static inline int ok_vec(int k)
{
	return k == OK_READV || k == OK_PREADV || k == OK_WRITEV || k == OK_PWRITEV;
}

int tb_set_okind(struct tb_ctx *c, int nr, int kind)
{
	if (nr < 0 || nr >= TB_NR_MAX || kind < 0 || kind > OK_FSTATAT)
		return -1;
	c->okind[nr] = (int8_t)kind;
	return 0;
}

void *tb_segs(struct tb_ctx *c)
{
	return c->segs;
}

static inline size_t map_home(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	return (size_t)x & (TB_MAP - 1);
}

static long map_find(struct tb_ctx *c, uint64_t ino)
{
	for (size_t i = map_home(ino), n = 0; n < TB_MAP; i = (i + 1) & (TB_MAP - 1), n++) {
		if (c->map_ino[i] == ino)
			return (long)i;
		if (!c->map_ino[i])
			return -1;
	}
	return -1;
}

/* Register a placeholder; -1 (and every fd call goes to Python from now on) when full. */
int tb_map_set(struct tb_ctx *c, uint64_t ino, int64_t handle)
{
	long at;

	if (c->o_nmap < 0)
		return -1;
	if (!ino || c->o_nmap >= TB_MAP / 2) {
		c->o_nmap = -1;
		return -1;
	}
	at = map_find(c, ino);
	if (at < 0) {
		size_t i = map_home(ino);

		while (c->map_ino[i])
			i = (i + 1) & (TB_MAP - 1);
		at = (long)i;
		c->map_ino[at] = ino;
		c->o_nmap++;
	}
	c->map_h[at] = handle;
	return 0;
}

/* Forget a placeholder (linear probing: later entries of its run move back). */
void tb_map_del(struct tb_ctx *c, uint64_t ino)
{
	long at = c->o_nmap > 0 ? map_find(c, ino) : -1;
	size_t i, j;

	if (at < 0)
		return;
	c->o_nmap--;
	i = j = (size_t)at;
	for (;;) {
		c->map_ino[i] = 0;
		for (;;) {
			size_t k;

			j = (j + 1) & (TB_MAP - 1);
			if (!c->map_ino[j])
				return;
			k = map_home(c->map_ino[j]);
			if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
				continue; /* its home lies between: it stays */
			break;
		}
		c->map_ino[i] = c->map_ino[j];
		c->map_h[i] = c->map_h[j];
		i = j;
	}
}

/* Test hook: the handle registered for ino, -1 if none, -2 once the table gave up. */
int64_t tb_map_get(struct tb_ctx *c, uint64_t ino)
{
	long at;

	if (c->o_nmap < 0)
		return -2;
	at = map_find(c, ino);
	return at < 0 ? -1 : c->map_h[at];
}

/* The remote handle of fd of task tid; -1: not a placeholder (local). */
static int64_t handle_of(struct tb_ctx *c, uint32_t tid, int32_t fd)
{
	char path[48], name[16];
	struct stat st;
	long at;
	int i = (int)(tid % TB_MEMFDS), rc = -1;

	if (fd < 0 || !c->o_nmap)
		return -1;
	/*
	 * stat("/proc/TID/fd/N") as Python does it, through a cached O_PATH fd of
	 * /proc/TID/fd (one procfs lookup instead of four).  A cached directory of
	 * a task that is gone fails: it is reopened once, so a reused TID is never
	 * answered from its predecessor.
	 */
	snprintf(name, sizeof(name), "%d", fd);
	for (int attempt = 0; attempt < 2 && rc; attempt++) {
		if (attempt || c->fdd_fd[i] < 0 || c->fdd_tid[i] != (int32_t)tid) {
			if (c->fdd_fd[i] >= 0)
				close(c->fdd_fd[i]);
			snprintf(path, sizeof(path), "/proc/%u/fd", tid);
			c->fdd_fd[i] = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
			c->fdd_tid[i] = (int32_t)tid;
			if (c->fdd_fd[i] < 0)
				return -1;
			attempt = 1;
		}
		rc = fstatat(c->fdd_fd[i], name, &st, 0);
	}
	if (rc || (int64_t)st.st_dev != c->pipe_dev || !S_ISFIFO(st.st_mode))
		return -1;
	at = map_find(c, (uint64_t)st.st_ino);
	return at < 0 ? -1 : c->map_h[at];
}

/* process_vm_readv of nsegs (addr, len) pairs into p: bytes read, 0 on EFAULT, -1 otherwise. */
static ssize_t pvm_read(uint32_t tid, uint8_t *p, size_t total, const uint64_t *segs, long nsegs)
{
	struct iovec local = {p, total};
	struct iovec remote[TB_IOV_MAX];
	ssize_t got;

	if (!nsegs)
		return 0;
	for (long i = 0; i < nsegs; i++) {
		remote[i].iov_base = (void *)(uintptr_t)segs[2 * i];
		remote[i].iov_len = (size_t)segs[2 * i + 1];
	}
	got = syscall(SYS_process_vm_readv, (long)tid, &local, 1UL, remote, (unsigned long)nsegs, 0UL);
	if (got < 0)
		return errno == EFAULT ? 0 : -1;
	return got;
}

/* Write data (n bytes) into the caller along the segments, in order: 1 if it all landed. */
static int pvm_write(uint32_t tid, const uint8_t *data, size_t n, const uint64_t *segs, long nsegs)
{
	struct iovec local[TB_IOV_MAX], remote[TB_IOV_MAX];
	size_t pos = 0;
	long k = 0;

	for (long i = 0; i < nsegs && pos < n; i++, k++) {
		size_t len = (size_t)segs[2 * i + 1];

		if (len > n - pos)
			len = n - pos;
		local[k].iov_base = (void *)(data + pos);
		local[k].iov_len = len;
		remote[k].iov_base = (void *)(uintptr_t)segs[2 * i];
		remote[k].iov_len = len;
		pos += len;
	}
	if (!n)
		return 1;
	if (pos != n)
		return 0;
	return syscall(SYS_process_vm_writev, (long)tid, local, (unsigned long)k, remote,
		       (unsigned long)k, 0UL) == (ssize_t)n;
}

static int id_valid(struct tb_ctx *c, uint64_t nid)
{
	return ioctl((int)c->listener, IOC_ID_VALID, &nid) == 0;
}

/* NOTIF_SEND of a return value (error: a negative errno): 0 sent, 1 caller gone. */
static int answer(struct tb_ctx *c, uint64_t nid, int64_t val, int32_t error)
{
	struct {
		uint64_t id;
		int64_t val;
		int32_t error;
		uint32_t flags;
	} resp = {nid, error ? 0 : val, error, 0};

	for (int i = 0; i < 100; i++) {
		if (ioctl((int)c->listener, IOC_SEND, &resp) == 0)
			return 0;
		if (errno != EINTR)
			return 1;
	}
	return 1;
}

/* ---- a small msgpack reader: exactly the types wire.decode yields as int/bytes/list */
struct mp {
	const uint8_t *p, *end;
};

static int mp_need(struct mp *m, size_t n)
{
	return (size_t)(m->end - m->p) >= n;
}

static uint64_t mp_be(const uint8_t *p, int n)
{
	uint64_t v = 0;

	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* An integer: 1 and *v (neg: it is negative), or 0 (another type, truncated). */
static int mp_int(struct mp *m, int64_t *v, int *neg)
{
	uint8_t t;
	int w;

	if (!mp_need(m, 1))
		return 0;
	t = *m->p;
	*neg = 0;
	if (t <= 0x7f) {
		*v = t;
		m->p++;
		return 1;
	}
	if (t >= 0xe0) {
		*v = (int8_t)t;
		*neg = 1;
		m->p++;
		return 1;
	}
	switch (t) {
	case 0xcc: w = 1; break;
	case 0xcd: w = 2; break;
	case 0xce: w = 4; break;
	case 0xcf: w = 8; break;
	case 0xd0: w = -1; break;
	case 0xd1: w = -2; break;
	case 0xd2: w = -4; break;
	case 0xd3: w = -8; break;
	default: return 0;
	}
	int n = w < 0 ? -w : w;

	if (!mp_need(m, 1 + (size_t)n))
		return 0;
	uint64_t u = mp_be(m->p + 1, n);

	m->p += 1 + n;
	if (w > 0) {
		if (u > (uint64_t)INT64_MAX)
			return 0; /* above int64: Python decides */
		*v = (int64_t)u;
		return 1;
	}
	if (n < 8 && (u >> (8 * n - 1)) & 1)
		u |= ~0ULL << (8 * n); /* sign-extend */
	*v = (int64_t)u;
	*neg = *v < 0;
	return 1;
}

static int mp_array(struct mp *m, uint32_t *n)
{
	uint8_t t;

	if (!mp_need(m, 1))
		return 0;
	t = *m->p;
	if ((t & 0xf0) == 0x90) {
		*n = t & 0x0f;
		m->p++;
		return 1;
	}
	if (t == 0xdc && mp_need(m, 3)) {
		*n = (uint32_t)mp_be(m->p + 1, 2);
		m->p += 3;
		return 1;
	}
	if (t == 0xdd && mp_need(m, 5)) {
		*n = (uint32_t)mp_be(m->p + 1, 4);
		m->p += 5;
		return 1;
	}
	return 0;
}

static int mp_bin(struct mp *m, const uint8_t **data, size_t *len)
{
	int w;

	if (!mp_need(m, 1))
		return 0;
	switch (*m->p) {
	case 0xc4: w = 1; break;
	case 0xc5: w = 2; break;
	case 0xc6: w = 4; break;
	default: return 0;
	}
	if (!mp_need(m, 1 + (size_t)w))
		return 0;
	*len = (size_t)mp_be(m->p + 1, w);
	m->p += 1 + w;
	if (!mp_need(m, *len))
		return 0;
	*data = m->p;
	m->p += *len;
	return 1;
}

struct oreply {
	int64_t ret, err, stamps[4];
	int nouts;
	int64_t out_arg[MAX_OUTS];
	const uint8_t *out[MAX_OUTS];
	size_t out_len[MAX_OUTS];
};

/*
 * A RESULT for call id as wire.decode reads it (the values it accepts, in
 * any integer and bin width), with at most MAX_OUTS output buffers: 1, or 0
 * (then Python decodes the frame and decides).
 */
int tb_parse_oresult(const uint8_t *f, size_t n, uint64_t id, struct oreply *r)
{
	struct mp m = {f, f + n};
	uint32_t len;
	int64_t v;
	int neg;

	if (n > (4u << 20) || !mp_array(&m, &len) || len != 7)
		return 0;
	if (!mp_int(&m, &v, &neg) || v != 2)
		return 0;
	if (!mp_need(&m, 7) || memcmp(m.p, "\xa6result", 7))
		return 0;
	m.p += 7;
	/* the id: uint64, compared whole (mp_int refuses above 2**63-1: Python decides) */
	if (!mp_need(&m, 1))
		return 0;
	if (*m.p == 0xcf) {
		if (!mp_need(&m, 9) || mp_be(m.p + 1, 8) != id)
			return 0;
		m.p += 9;
	} else if (!mp_int(&m, &v, &neg) || neg || (uint64_t)v != id) {
		return 0;
	}
	if (!mp_int(&m, &r->ret, &neg))
		return 0;
	if (!mp_int(&m, &r->err, &neg) || neg || r->err > 4095)
		return 0;
	if (!mp_array(&m, &len) || len != 4)
		return 0;
	for (int i = 0; i < 4; i++)
		if (!mp_int(&m, &r->stamps[i], &neg) || neg)
			return 0;
	if (!mp_array(&m, &len) || len > MAX_OUTS)
		return 0;
	r->nouts = (int)len;
	for (int i = 0; i < r->nouts; i++) {
		uint32_t two;

		if (!mp_array(&m, &two) || two != 2 || !mp_int(&m, &r->out_arg[i], &neg) || neg ||
		    r->out_arg[i] > 5 || !mp_bin(&m, &r->out[i], &r->out_len[i]))
			return 0;
	}
	return m.p == m.end;
}

/* _invalid: 1 if the reply can answer this call (else Python fails it with EIO). */
static int oreply_valid(const struct oreply *r, int k, int64_t want)
{
	for (int i = 0; i < r->nouts; i++)
		for (int j = 0; j < i; j++)
			if (r->out_arg[i] == r->out_arg[j])
				return 0;
	if (r->err)
		return r->err > 0 && r->err < 4096 && r->ret == -r->err && !r->nouts;
	if (r->ret < 0)
		return 0;
	int64_t exp_arg = ok_read(k) ? 1 : k == OK_FSTAT ? 1 : k == OK_FSTATAT ? 2 : -1;

	for (int i = 0; i < r->nouts; i++) {
		if (r->out_arg[i] != exp_arg)
			return 0;
		if (ok_read(k) ? (int64_t)r->out_len[i] != r->ret : r->out_len[i] != STAT_SIZE)
			return 0;
	}
	if (ok_read(k) || ok_write(k)) {
		if (r->ret > want)
			return 0;
		return !(r->ret && ok_read(k) && !r->nouts);
	}
	if (k == OK_LSEEK)
		return 1;
	return r->ret == 0;
}

/* Raw ZMTP: send out[0..n) whole (waiting for room until the call's deadline); as raw_send. */
static int raw_send_all(struct tb_ctx *c, uint8_t *out, size_t n)
{
	int sent = raw_send(c, out, n);
	int64_t deadline = c->t_send + c->wait_ns;

	while (sent == 1) {
		struct pollfd pf = {(int)c->raw_fd, POLLOUT, 0};
		int64_t left = deadline - now_ns();

		if (left <= 0 || poll(&pf, 1, (int)(left / 1000000) + 1) < 0)
			return 1;
		if (!(pf.revents & (POLLOUT | POLLERR | POLLHUP)))
			continue;
		ssize_t w = send((int)c->raw_fd, c->out + c->tail_off, (size_t)c->tail_len,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			c->raw_err = errno;
			return 1;
		}
		c->tail_off += w;
		c->tail_len -= w;
		if (!c->tail_len) {
			c->tail_off = 0;
			sent = 0;
		}
	}
	return sent;
}

/* The reply to the call in hand: TB_NONE with frame/frame_len, or TB_INFLIGHT / TB_FRAME. */
static int off_wait(struct tb_ctx *c, int64_t until)
{
	zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {NULL, (int)c->listener, ZMQ_POLLIN, 0}};
	int64_t deadline = c->t_send + c->wait_ns;

	if (c->raw_fd >= 0) {
		int more = 0;
		int rc = raw_wait(c, until, &more);

		if (rc != TB_NONE)
			return rc;
		c->t_reply = now_ns();
		return more ? TB_FRAME : TB_NONE;
	}
	for (;;) {
		long ms = 0;

		if (!c->busy) {
			int64_t left = deadline - now_ns();

			if (left <= 0)
				return TB_INFLIGHT;
			ms = (long)(left / 1000000) + 1;
		}
		int rc = c->zpoll(items, c->ra_quiet ? 1 : 2, ms);

		if (rc < 0)
			return TB_INFLIGHT;
		if (rc == 0) {
			int64_t now = now_ns();

			if (!c->busy || now >= deadline || now >= until)
				return TB_INFLIGHT;
			sched_yield();
			continue;
		}
		if (items[0].revents & ZMQ_POLLIN) {
			c->zinit(&c->msg);
			if (c->zrecv(&c->msg, c->sock, ZMQ_DONTWAIT) < 0) {
				c->zclose(&c->msg);
				continue;
			}
			c->msg_open = 1;
			c->t_reply = now_ns();
			break;
		}
		return TB_INFLIGHT;
	}
	c->frame = c->zdata(&c->msg);
	c->frame_len = (int64_t)c->zsize(&c->msg);
	return c->zmore(&c->msg) ? TB_FRAME : TB_NONE;
}


/* ------------------------------------------------------------------ read-ahead
 *
 * --offload-read-ahead N (docs/offload.md, "Read-ahead").  After two full
 * plain reads of the same size on one placeholder with no other remote call
 * between them, and an lseek(h, 0, SEEK_CUR) that says the file is seekable,
 * up to N further reads of that size (at most RA_BYTES) are sent at once and
 * kept in flight: each program read of the same size on that placeholder is
 * answered from the oldest, and one more is sent while its last answer was
 * full.  Each is exactly the read the program's next read would have made,
 * made earlier.  Before any other remote call (and before tb_forward returns
 * to Python) the stream is settled: every reply is waited for and the bytes
 * read ahead but not used are given back with lseek(h, -bytes, SEEK_CUR), so
 * the file's offset is where the program's reads left it.  A reply that
 * never comes or does not fit the read sets ra_lost.
 */
static int ra_refused(struct tb_ctx *c, int64_t h)
{
	for (int i = 0; i < RA_NO; i++)
		if (c->ra_no[i] == h)
			return 1;
	return 0;
}

static void ra_refuse(struct tb_ctx *c, int64_t h)
{
	c->ra_no[c->ra_no_next] = h;
	c->ra_no_next = (c->ra_no_next + 1) % RA_NO;
}

/* One frame within deadline, the listener not watched: TB_NONE, else -1 (nothing usable). */
static int ra_frame(struct tb_ctx *c, int64_t deadline)
{
	c->ra_quiet = 1;
	for (;;) {
		c->t_send = now_ns();
		int rc = off_wait(c, deadline);

		if (rc == TB_NONE)
			break;
		if (rc == TB_FRAME || c->raw_err || now_ns() >= deadline) {
			if (rc == TB_FRAME)
				tb_frame_done(c);
			c->ra_quiet = 0;
			return -1;
		}
	}
	c->ra_quiet = 0;
	return TB_NONE;
}

/* Send a fixed-width offload CALL with no buffers: 0 sent, -1 nothing sent, 1 in part
 * (the rest queued for Python: raw ZMTP). */
static int ra_send(struct tb_ctx *c, uint64_t id, uint32_t tid, int32_t nr, const uint64_t *args)
{
	uint8_t *out = c->out + OUT_HEAD;
	size_t n = call_head(out, id, tid, (uint16_t)nr, args, 0);

	memcpy(out + n, "\xa7offload", 8);
	n += 8;
	c->t_send = now_ns();
	if (c->raw_fd >= 0)
		return raw_send_all(c, out, n);
	return c->zsend(c->sock, out, n, ZMQ_DONTWAIT) < 0 ? -1 : 0;
}

/* Keep a held slot's data: copied out of the frame in hand, which is then let go. */
static void ra_unhold(struct tb_ctx *c, struct ra_slot *s)
{
	if (!s->held)
		return;
	if (s->ret > 0)
		memcpy(s->buf, s->data, (size_t)s->ret);
	s->data = s->buf;
	s->held = 0;
	tb_frame_done(c);
}

/*
 * A reply for a slot in flight: stored in it; 0, or -1 (not one of ours, or
 * invalid).  mode 0: only its result (a settle); 1: its data too, and the
 * oldest slot's is not copied but held in the frame (served right away).
 */
static int ra_absorb(struct tb_ctx *c, int mode)
{
	struct oreply r;

	for (int j = 0; j < c->ra_n; j++) {
		struct ra_slot *s = &c->ra[(c->ra_head + j) % RA_MAX];

		if (s->ready || !tb_parse_oresult(c->frame, (size_t)c->frame_len, s->id, &r))
			continue;
		if (!oreply_valid(&r, OK_READ, s->want))
			return -1;
		s->err = r.err;
		s->ret = r.err ? -r.err : r.ret;
		s->data = s->buf;
		if (mode && !r.err && r.nouts) {
			if (j == 0) {
				s->data = r.out[0];
				s->held = 1;
			} else {
				memcpy(s->buf, r.out[0], r.out_len[0]);
			}
		}
		memcpy(s->stamps, r.stamps, sizeof(s->stamps));
		s->t_reply = c->t_reply;
		s->ready = 1;
		if (!s->held)
			tb_frame_done(c);
		return 0;
	}
	return -1;
}

/* Wait until slot j of the stream (0: the oldest) has its reply (mode: ra_absorb's):
 * 0, or -1 (ra_lost set). */
static int ra_pump(struct tb_ctx *c, int j, int mode)
{
	struct ra_slot *s = &c->ra[(c->ra_head + j) % RA_MAX];

	while (!s->ready) {
		if (ra_frame(c, s->t_send + c->ra_timeout_ns) < 0 || ra_absorb(c, mode) < 0) {
			tb_frame_done(c);
			c->ra_lost = 1;
			c->ra_n = 0; /* nothing of the stream is usable any more */
			c->ra_handle = -1;
			return -1;
		}
	}
	return 0;
}

/* One lseek(h, off, whence) now, nothing else in flight: its return (or -errno), or
 * INT64_MIN (no usable reply: ra_lost set). */
static int64_t ra_lseek(struct tb_ctx *c, int64_t h, int64_t off, int whence)
{
	uint64_t args[6] = {(uint64_t)h, (uint64_t)off, (uint64_t)whence, 0, 0, 0};
	uint64_t id = c->next_id++;
	int64_t t0 = now_ns();
	struct oreply r;

	c->ra_lseeks++;
	if (ra_send(c, id, 0, 8 /* lseek */, args) != 0 || ra_frame(c, t0 + c->ra_timeout_ns) < 0 ||
	    !tb_parse_oresult(c->frame, (size_t)c->frame_len, id, &r) ||
	    !oreply_valid(&r, OK_LSEEK, 0)) {
		tb_frame_done(c);
		c->ra_lost = 1;
		return INT64_MIN;
	}
	tb_frame_done(c);
	return r.err ? -r.err : r.ret;
}

/* Send one more read of the stream's size: 0, or -1 (then no more are sent). */
static int ra_issue(struct tb_ctx *c)
{
	struct ra_slot *s = &c->ra[(c->ra_head + c->ra_n) % RA_MAX];
	uint64_t args[6] = {(uint64_t)c->ra_handle, 0, (uint64_t)c->ra_want, 0, 0, 0};

	if (s->cap < (size_t)c->ra_want) {
		uint8_t *b = realloc(s->buf, (size_t)c->ra_want);

		if (!b)
			return -1;
		s->buf = b;
		s->cap = (size_t)c->ra_want;
	}
	s->id = c->next_id++;
	s->want = c->ra_want;
	s->ready = 0;
	if (ra_send(c, s->id, 0, 0 /* read */, args) != 0) {
		c->ra_lost = 1;
		return -1;
	}
	s->t_send = c->t_send;
	c->ra_n++;
	c->ra_issued++;
	c->o_remote++;
	return 0;
}

/* Settle the stream (see above): 0, or -1 (ra_lost set: the file offset is unknown). */
static int ra_settle(struct tb_ctx *c)
{
	int64_t back = 0;

	if (!c->ra_n) {
		c->ra_handle = -1;
		return 0;
	}
	for (int j = 0; j < c->ra_n; j++) {
		struct ra_slot *s = &c->ra[(c->ra_head + j) % RA_MAX];

		if (s->held) { /* its data is not wanted any more */
			s->held = 0;
			tb_frame_done(c);
		}
		if (ra_pump(c, j, 0) < 0)
			return -1;

		back += s->ret > 0 ? s->ret : 0;
		c->ra_wasted++;
	}
	int64_t h = c->ra_handle;

	c->ra_n = 0;
	c->ra_handle = -1;
	if (!back)
		return 0;
	c->ra_undone += back;
	if (ra_lseek(c, h, -back, SEEK_CUR) < 0) {
		c->ra_lost = 1; /* the offset could not be put back */
		return -1;
	}
	if (c->ra_strike_h != h) {
		c->ra_strike_h = h;
		c->ra_strikes = 0;
	}
	if (++c->ra_strikes >= 2)
		ra_refuse(c, h); /* read ahead and thrown away twice: not this one */
	return 0;
}

/* After a plain read served in C: count the run, start a stream after the second. */
static void ra_after_read(struct tb_ctx *c, int64_t h, int64_t want, int64_t ret)
{
	if (!c->ra_depth || c->ra_lost || ra_refused(c, h))
		return;
	if (ret != want || want <= 0) {
		c->ra_last = -1;
		return;
	}
	if (c->ra_last == h && c->ra_last_want == want) {
		c->ra_run++;
	} else {
		c->ra_last = h;
		c->ra_last_want = want;
		c->ra_run = 1;
	}
	if (c->ra_run < 2)
		return;
	int64_t pos = ra_lseek(c, h, 0, SEEK_CUR);

	if (pos == INT64_MIN)
		return;
	if (pos < 0) { /* not seekable: what was read ahead could not be given back */
		ra_refuse(c, h);
		return;
	}
	int64_t depth = c->ra_depth < RA_MAX ? c->ra_depth : RA_MAX;

	if (depth * want > RA_BYTES)
		depth = RA_BYTES / want > 0 ? RA_BYTES / want : 1;
	c->ra_handle = h;
	c->ra_want = want;
	c->ra_eof = 0;
	c->ra_head = 0;
	c->ra_n = 0;
	c->ra_last = -1;
	for (int64_t i = 0; i < depth; i++)
		if (ra_issue(c) < 0)
			break;
}

/*
 * A plain read of the stream's placeholder: OFF_NEXT (answered from the oldest
 * slot), TB_NONE (not served this way: settle and go the usual way), TB_TRAP
 * (ra_lost: Python takes over).
 */
static int ra_serve(struct tb_ctx *c, uint64_t nid, uint32_t tid, int32_t nr, const uint64_t *args)
{
	uint64_t count = args[2];
	int64_t want = (int64_t)(count < TB_MAX_BUFFER ? count : TB_MAX_BUFFER);

	if (want != c->ra_want || syscall(SYS_read, (long)c->devnull, args[1], count) < 0)
		return TB_NONE; /* another size, or a buffer the kernel refuses: the usual way */
	if (ra_pump(c, 0, 1) < 0)
		return TB_TRAP;
	struct ra_slot *s = &c->ra[c->ra_head];
	uint64_t seg[2] = {args[1], (uint64_t)want};
	int gone = 0;

	if (!id_valid(c, nid)) {
		c->caller_gone++;
		ra_unhold(c, s);
		return OFF_NEXT; /* the slot stays for whoever reads next */
	}
	if (s->err) {
		gone = answer(c, nid, 0, -(int32_t)s->err);
	} else {
		if (s->ret && !pvm_write(tid, s->data, (size_t)s->ret, seg, 1)) {
			ra_unhold(c, s);
			return TB_NONE; /* did not land: settled (given back), then the usual way */
		}
		gone = answer(c, nid, s->ret, 0);
	}
	if (s->held) { /* answered: the frame it lay in can go */
		s->held = 0;
		tb_frame_done(c);
	}
	struct tb_record *rec = &c->rec[c->nrec];

	rec->seq = c->seq + (uint64_t)c->nrec;
	rec->tid = (int32_t)tid;
	rec->nr = (int16_t)nr;
	rec->flags = F_AHEAD | (gone ? F_CALLER_GONE : 0);
	rec->ret = s->ret;
	rec->bytes_in = 0;
	rec->bytes_out = s->ret > 0 ? (uint32_t)s->ret : 0;
	rec->t_trap = c->t_trap;
	rec->t_send = s->t_send;
	rec->t_reply = s->t_reply;
	rec->t_resume = now_ns();
	rec->d_recv = s->stamps[0];
	rec->d_exec_start = s->stamps[1];
	rec->d_exec_end = s->stamps[2];
	rec->d_send = s->stamps[3];
	c->nrec++;
	c->served++;
	c->ra_served++;
	c->caller_gone += gone;
	int full = !s->err && s->ret == s->want;

	c->ra_head = (c->ra_head + 1) % RA_MAX;
	c->ra_n--;
	if (!full)
		c->ra_eof = 1; /* end of file (or an error): nothing more is sent ahead */
	if (!c->ra_eof && !c->ra_lost)
		ra_issue(c);
	if (!c->ra_n)
		c->ra_handle = -1;
	return OFF_NEXT;
}


/*
 * A read or pread of want > chunk bytes into one buffer (addr), as several
 * reads of at most chunk bytes sent at once (a read's in order: the delegate
 * runs them in order; a pread's at their offsets), each written into the
 * caller as it arrives while the delegate reads the next.  The answer is
 * what one call gives: the bytes up to the first short chunk, error or hole
 * in the caller's buffer (EFAULT / the error if none); a read's offset is
 * moved back by what was read beyond that.  OFF_NEXT, TB_NONE (not this way:
 * the usual path) or TB_TRAP (nothing sent, or ra_lost: Python takes over).
 */
static int ra_chunked(struct tb_ctx *c, uint64_t nid, uint32_t tid, int32_t nr, int k, int64_t h,
		      uint64_t off, uint64_t addr, int64_t want)
{
	int64_t chunk = c->chunk, m = (want + chunk - 1) / chunk;
	int64_t total = 0, back = 0, t_last = 0, st0[4] = {0}, st1[4] = {0};
	int32_t err = 0;
	int stop = 0;

	if (m > RA_MAX || c->ra_n)
		return TB_NONE;
	for (int64_t i = 0; i < m; i++) {
		struct ra_slot *s = &c->ra[i];

		if (s->cap < (size_t)chunk) {
			uint8_t *b = realloc(s->buf, (size_t)chunk);

			if (!b)
				return TB_NONE;
			s->buf = b;
			s->cap = (size_t)chunk;
		}
	}
	if (!id_valid(c, nid)) {
		c->caller_gone++;
		return OFF_NEXT;
	}
	c->ra_head = 0;
	c->ra_n = 0;
	for (int64_t i = 0; i < m; i++) {
		struct ra_slot *s = &c->ra[i];
		int64_t size = want - i * chunk < chunk ? want - i * chunk : chunk;
		uint64_t a[6] = {(uint64_t)h, 0, (uint64_t)size,
				 k == OK_PREAD ? off + (uint64_t)(i * chunk) : 0, 0, 0};

		s->id = c->next_id++;
		s->want = size;
		s->ready = s->held = 0;
		int sent = ra_send(c, s->id, tid, nr, a);

		if (sent < 0 && i == 0)
			return TB_TRAP; /* nothing sent: Python makes the call */
		if (sent != 0) {
			c->ra_lost = 1; /* chunks sent and one not: the file offset is unknown */
			c->ra_n = 0;
			return TB_TRAP;
		}
		s->t_send = c->t_send;
		c->ra_n++;
	}
	c->o_remote++; /* one call of the program's, sent */
	int64_t t_first = c->ra[0].t_send;

	for (int64_t i = 0; i < m; i++) {
		struct ra_slot *s = &c->ra[c->ra_head];

		if (ra_pump(c, 0, !stop) < 0)
			return TB_TRAP; /* ra_lost */
		if (!i)
			memcpy(st0, s->stamps, sizeof(st0));
		memcpy(st1, s->stamps, sizeof(st1));
		t_last = s->t_reply;
		if (stop) {
			back += s->ret > 0 ? s->ret : 0;
		} else if (s->err) {
			err = total ? 0 : (int32_t)s->err;
			stop = 1;
		} else {
			ssize_t w = 0;

			if (s->ret > 0) {
				struct iovec l = {(void *)s->data, (size_t)s->ret};
				struct iovec r = {(void *)(uintptr_t)(addr + (uint64_t)(i * chunk)),
						  (size_t)s->ret};

				w = syscall(SYS_process_vm_writev, (long)tid, &l, 1UL, &r, 1UL, 0UL);
				if (w < 0)
					w = 0;
			}
			total += w;
			if (w < s->ret) { /* a hole in the caller's buffer: the kernel stops there */
				back += s->ret - w;
				if (!total)
					err = EFAULT;
				stop = 1;
			} else if (s->ret < s->want) {
				stop = 1; /* end of file */
			}
		}
		if (s->held) {
			s->held = 0;
			tb_frame_done(c);
		}
		c->ra_head = (c->ra_head + 1) % RA_MAX;
		c->ra_n--;
	}
	c->ra_head = 0;
	if (k == OK_READ && back && ra_lseek(c, h, -back, SEEK_CUR) < 0)
		return TB_TRAP; /* ra_lost: the offset could not be put back */
	int gone = err ? answer(c, nid, 0, -err) : answer(c, nid, total, 0);
	struct tb_record *rec = &c->rec[c->nrec];

	rec->seq = c->seq + (uint64_t)c->nrec;
	rec->tid = (int32_t)tid;
	rec->nr = (int16_t)nr;
	rec->flags = gone ? F_CALLER_GONE : 0;
	rec->ret = err ? -err : total;
	rec->bytes_in = 0;
	rec->bytes_out = (uint32_t)total;
	rec->t_trap = c->t_trap;
	rec->t_send = t_first;
	rec->t_reply = t_last;
	rec->t_resume = now_ns();
	rec->d_recv = st0[0];
	rec->d_exec_start = st0[1];
	rec->d_exec_end = st1[2];
	rec->d_send = st1[3];
	c->nrec++;
	c->served++;
	c->o_chunked++;
	c->caller_gone += gone;
	if (k == OK_READ && !err)
		ra_after_read(c, h, want, total);
	return OFF_NEXT;
}

/* Serve one offload-mode notification: OFF_NEXT, or a TB_* code for Python. */
static int off_call(struct tb_ctx *c, uint64_t nid, uint32_t tid, int32_t nr, uint64_t *args,
		    int64_t until)
{
	int k = (nr >= 0 && nr < TB_NR_MAX) ? c->okind[nr] : 0;
	uint8_t *out = c->out + OUT_HEAD;
	uint8_t *data = out + CALL_FIX + BUF_HEAD;
	int64_t handle, want = 0, nbytes = 0;
	long nsegs = 0;
	int nbufs = 0;
	size_t dlen = 0;

	if (!k || c->o_nmap < 0)
		return TB_TRAP;
	if (k == OK_FSTATAT) { /* newfstatat(fd, "", st, AT_EMPTY_PATH): an fd call */
		uint8_t first;
		uint64_t seg[2] = {args[1], 1};

		if (!(args[3] & AT_EMPTY_PATH) || (int32_t)args[0] < 0 ||
		    pvm_read(tid, &first, 1, seg, 1) != 1 || first)
			return TB_TRAP; /* a path, the cwd, an unreadable one: Python decides */
	}
	handle = handle_of(c, tid, (int32_t)args[0]);
	if (handle < 0) { /* a local fd: the kernel serves it */
		if (resume(c, nid) < 0)
			return TB_TRAP;
		c->o_local++;
		return OFF_NEXT;
	}
	args[0] = (uint64_t)handle;
	if (c->ra_n) { /* a read-ahead stream: serve from it, or settle it first */
		if (k == OK_READ && handle == c->ra_handle) {
			int rr = ra_serve(c, nid, tid, nr, args);

			if (rr != TB_NONE)
				return rr;
		}
		if (ra_settle(c) < 0)
			return TB_TRAP; /* ra_lost: Python takes the delegate as lost */
	}
	if (k != OK_READ)
		c->ra_last = -1; /* a run of reads is only reads */
	if (ok_read(k) || ok_write(k)) {
		uint64_t addr = args[1], count = args[2], total = count;
		long verdict = 0;

		if (ok_vec(k)) {
			uint32_t cnt = (uint32_t)count;

			if (cnt > TB_IOV_MAX) {
				verdict = EINVAL;
				total = 0;
			} else if (cnt) {
				uint64_t seg[2] = {addr, (uint64_t)cnt * 16};
				ssize_t got = pvm_read(tid, c->iovs, (size_t)cnt * 16, seg, 1);

				if (got < 0)
					return TB_TRAP;
				if ((size_t)got < (size_t)cnt * 16) {
					int bad = 0;

					for (long i = 0; i < got / 16; i++) {
						uint64_t l;

						memcpy(&l, c->iovs + 16 * i + 8, 8);
						bad |= l >= (1ULL << 63);
					}
					verdict = bad ? EINVAL : EFAULT;
					total = 0;
				} else {
					long t = syscall(SYS_writev, (long)c->devnull, c->iovs, count);

					if (t < 0) {
						verdict = errno;
						total = 0;
					} else {
						uint64_t left = (uint64_t)t < TB_MAX_BUFFER ? (uint64_t)t :
											     TB_MAX_BUFFER;

						total = (uint64_t)t;
						for (uint32_t i = 0; i < cnt && left; i++) {
							uint64_t base, l;

							memcpy(&base, c->iovs + 16 * i, 8);
							memcpy(&l, c->iovs + 16 * i + 8, 8);
							if (l > left)
								l = left;
							if (!l)
								continue;
							c->segs[2 * nsegs] = base;
							c->segs[2 * nsegs + 1] = l;
							nsegs++;
							left -= l;
						}
					}
				}
			} else {
				total = 0;
			}
		} else {
			long t = syscall(ok_write(k) ? SYS_write : SYS_read, (long)c->devnull, addr, count);

			verdict = t < 0 ? errno : 0;
			if (count && !verdict) {
				c->segs[0] = addr;
				c->segs[1] = count < TB_MAX_BUFFER ? count : TB_MAX_BUFFER;
				nsegs = 1;
			}
		}
		if (verdict)
			nsegs = 0;
		for (long i = 0; i < nsegs; i++)
			want += (int64_t)c->segs[2 * i + 1];
		if (ok_write(k)) {
			ssize_t got = pvm_read(tid, data, (size_t)want, c->segs, nsegs);

			if (got < 0)
				return TB_TRAP; /* gone, or not permitted here: Python decides */
			if (nsegs && !got)
				verdict = EFAULT; /* not one byte readable: the kernel's EFAULT */
			dlen = (size_t)got;
			want = nbytes = got;
			nbufs = 1;
			nsegs = 0;
		}
		args[1] = (uint64_t)verdict;
		args[2] = total;
		if (c->chunk && (k == OK_READ || k == OK_PREAD) && !verdict && nsegs == 1 &&
		    want > c->chunk) {
			int rr = ra_chunked(c, nid, tid, nr, k, handle, args[3], c->segs[0], want);

			if (rr != TB_NONE)
				return rr;
		}
	} else if (k == OK_FSTATAT) {
		nbufs = 1; /* the empty path */
	}
	if (!id_valid(c, nid)) { /* what was read must still be the caller's (TOCTOU) */
		c->caller_gone++;
		return OFF_NEXT;
	}
	call_head(out, c->next_id, tid, (uint16_t)nr, args, nbufs);
	uint8_t *p = out + CALL_FIX;

	if (nbufs) {
		buf_head(p, 1, (uint32_t)dlen);
		p += BUF_HEAD + dlen;
	}
	memcpy(p, "\xa7offload", 8);
	p += 8;
	c->nbytes = nbytes;
	c->o_handle = handle;
	c->o_want = want;
	c->o_nsegs = nsegs;
	c->t_send = now_ns();
	int partial = 0;

	if (c->raw_fd >= 0) {
		int sent = raw_send_all(c, out, (size_t)(p - out));

		if (sent < 0)
			return TB_TRAP; /* nothing left: Python sends it */
		partial = sent > 0;
	} else if (c->zsend(c->sock, out, (size_t)(p - out), ZMQ_DONTWAIT) < 0) {
		return TB_TRAP;
	}
	c->call_id = c->next_id++;
	c->o_remote++;
	if (partial)
		return TB_INFLIGHT;

	int rc = off_wait(c, until);

	if (rc != TB_NONE)
		return rc;

	struct oreply r;

	if (!tb_parse_oresult(c->frame, (size_t)c->frame_len, c->call_id, &r) ||
	    !oreply_valid(&r, k, want))
		return TB_FRAME; /* another call's, malformed or invalid: Python decides */
	int64_t seen = r.err ? -r.err : r.ret;
	int gone = 0;
	int64_t nout = 0;

	for (int i = 0; i < r.nouts; i++)
		nout += (int64_t)r.out_len[i];
	if (r.err || !(ok_read(k) || k == OK_FSTAT || k == OK_FSTATAT)) {
		/* nothing to write into the caller: NOTIF_SEND itself says if it is gone */
		gone = r.err ? answer(c, nid, 0, (int32_t)-r.err) : answer(c, nid, r.ret, 0);
	} else if (!id_valid(c, nid)) {
		gone = 1;
	} else {
		if (ok_read(k) && r.nouts && !pvm_write(tid, r.out[0], r.out_len[0], c->segs, nsegs))
			return TB_FRAME; /* short: Python writes it again and moves the offset back */
		if ((k == OK_FSTAT || k == OK_FSTATAT) && r.nouts) {
			uint64_t seg[2] = {args[k == OK_FSTAT ? 1 : 2], STAT_SIZE};

			if (seg[0] && !pvm_write(tid, r.out[0], STAT_SIZE, seg, 1))
				return TB_FRAME; /* Python answers EFAULT */
		}
		gone = answer(c, nid, r.ret, 0);
	}
	int64_t t_resume = now_ns();

	tb_frame_done(c);
	struct tb_record *rec = &c->rec[c->nrec];

	rec->seq = c->seq + (uint64_t)c->nrec;
	rec->tid = (int32_t)tid;
	rec->nr = (int16_t)nr;
	rec->flags = gone ? F_CALLER_GONE : 0;
	rec->ret = seen;
	rec->bytes_in = (uint32_t)nbytes;
	rec->bytes_out = (uint32_t)nout;
	rec->t_trap = c->t_trap;
	rec->t_send = c->t_send;
	rec->t_reply = c->t_reply;
	rec->t_resume = t_resume;
	rec->d_recv = r.stamps[0];
	rec->d_exec_start = r.stamps[1];
	rec->d_exec_end = r.stamps[2];
	rec->d_send = r.stamps[3];
	c->nrec++;
	c->served++;
	c->caller_gone += gone;
	if (k == OK_READ && !r.err)
		ra_after_read(c, handle, want, r.ret);
	return OFF_NEXT;
}

static int forward_loop(struct tb_ctx *c);

/*
 * Serve calls until one needs Python, the record buffer fills or slice_ns
 * passed; a read-ahead stream is settled before Python gets the connection.
 */
int tb_forward(struct tb_ctx *c)
{
	int rc = forward_loop(c);

	if (c->ra_n && rc != TB_INFLIGHT && rc != TB_FRAME && rc != TB_REPLY)
		ra_settle(c);
	if (rc == TB_TRAP)
		c->ra_last = -1;
	return rc;
}

static int forward_loop(struct tb_ctx *c)
{
	int64_t until = now_ns() + c->slice_ns;
	uint8_t *out = c->out + OUT_HEAD;

	for (int first = 1;; first = 0) {
		if (c->nrec >= TB_CAP)
			return TB_FULL;
		if (!first && now_ns() >= until)
			return TB_NONE;
		memset(c->notif, 0, NOTIF_SIZE);
		if (ioctl((int)c->listener, IOC_RECV, c->notif) < 0) {
			if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
				return TB_NONE;
			c->err = errno;
			return TB_ERROR;
		}
		c->t_trap = now_ns();

		uint64_t nid;
		uint32_t tid;
		int32_t nr;
		uint64_t args[6];

		memcpy(&nid, c->notif, 8);
		memcpy(&tid, c->notif + 8, 4);
		memcpy(&nr, c->notif + 16, 4);
		memcpy(args, c->notif + 32, 48);
		if (c->offload && c->shm_base)
			return TB_TRAP; /* (not served here: attach() does not ask) */
		if (c->offload) {
			int rc = off_call(c, nid, tid, nr, args, until);

			if (rc == OFF_NEXT)
				continue;
			return rc;
		}
		if (nr < 0 || nr >= TB_NR_MAX || !c->kind[nr]) {
			if (nr == 59 || nr == 322) /* execve(at): a new address space follows */
				forget_mem(c, (int32_t)tid);
			return TB_TRAP;
		}
		if (c->kind[nr] == 3) { /* watched: count it, continue it, send nothing */
			if (resume(c, nid) < 0)
				return TB_TRAP; /* Python continues (and counts) it */
			count_watched(c, nr, args);
			continue;
		}
		if (c->trap_only) { /* the benchmark's trap-only row: continue at once */
			if (resume(c, nid) < 0)
				return TB_TRAP;
			c->served++;
			continue;
		}
		size_t n = CALL_FIX + 5;
		int64_t nbytes = 0;

		if (c->kind[nr] == 2 && args[(int)c->buf_arg[nr]]) {
			uint64_t want = args[(int)c->size_arg[nr]];
			size_t len = want < TB_MAX_BUFFER ? (size_t)want : TB_MAX_BUFFER;

			if (len) {
				int fd = mem_fd(c, (int32_t)tid);
				ssize_t got = fd < 0 ? -1 :
					pread(fd, out + CALL_FIX + BUF_HEAD, len,
					      (off_t)args[(int)c->buf_arg[nr]]);

				if (got <= 0) { /* let Python decide (reopen, EFAULT, unreadable) */
					forget_mem(c, (int32_t)tid);
					return TB_TRAP;
				}
				len = (size_t)got;
			}
			memcpy(out + CALL_FIX + BUF_HEAD + len, "\xa4" "cost", 5);
			buf_head(out + CALL_FIX, c->buf_arg[nr], (uint32_t)len);
			n = CALL_FIX + BUF_HEAD + len + 5;
			nbytes = (int64_t)len;
			call_head(out, c->next_id, tid, (uint16_t)nr, args, 1);
		} else {
			call_head(out, c->next_id, tid, (uint16_t)nr, args, 0);
			memcpy(out + CALL_FIX, "\xa4" "cost", 5);
		}
		c->nbytes = nbytes;
		c->t_send = now_ns();
		int partial = 0;

		if (c->shm_base) {
			if (shm_put(c, out, n) < 0)
				return TB_TRAP; /* Python sends it (full: held), or finds the bad index */
		} else if (c->raw_fd >= 0) {
			int sent = raw_send(c, out, n);

			if (sent < 0)
				return TB_TRAP; /* Python sends it (buffered), or notes the error */
			partial = sent > 0;
		} else if (c->zsend(c->sock, out, n, ZMQ_DONTWAIT) < 0) {
			return TB_TRAP; /* Python sends again, or releases it unsent */
		}
		c->call_id = c->next_id++;
		if (c->stages)
			c->t_sent = now_ns();
		if (partial)
			return TB_INFLIGHT; /* Python writes the rest, then waits */
		int rc = wait_reply(c, nid, (int32_t)tid, (int16_t)nr, until);

		if (rc != TB_NONE)
			return rc;
	}
}

/* The benchmark's "raw ZeroMQ, C client" row: n round trips of frame on c->sock. */
int tb_zmq_rtt(struct tb_ctx *c, const uint8_t *frame, size_t len, long n, uint32_t *lat)
{
	zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
	zmq_msg_t m;

	for (long i = 0; i < n; i++) {
		int64_t t0 = now_ns();

		if (c->zsend(c->sock, frame, len, 0) < 0)
			return -1;
		for (;;) {
			int rc = c->zpoll(&item, 1, c->busy ? 0 : 5000);

			if (rc > 0)
				break;
			if (rc < 0 && errno != EINTR)
				return -1;
			if (now_ns() - t0 > 5000000000LL)
				return -1;
		}
		c->zinit(&m);
		if (c->zrecv(&m, c->sock, 0) < 0) {
			c->zclose(&m);
			return -1;
		}
		c->zclose(&m);
		lat[i] = (uint32_t)(now_ns() - t0);
	}
	return 0;
}

/* Read exactly len bytes from fd (spinning with MSG_DONTWAIT when busy); 0, or -1. */
static int zmtp_read(int fd, uint8_t *p, size_t len, int busy, int64_t t0)
{
	while (len) {
		ssize_t r = recv(fd, p, len, busy ? MSG_DONTWAIT : 0);

		if (r < 0 && (errno == EINTR || errno == EAGAIN)) {
			if (now_ns() - t0 > 5000000000LL)
				return -1;
			continue;
		}
		if (r <= 0)
			return -1;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

/*
 * The benchmark's "raw ZMTP from C" row: n round trips of msg (one message,
 * already in ZMTP frames) on fd, a TCP connection past the ZMTP handshake
 * (testbed/zmtp.py); no libzmq on this side.  Each reply's frames are read
 * up to the last part; commands between them are skipped.  body (cap bytes)
 * holds a frame's body.
 */
int tb_zmtp_rtt(int fd, const uint8_t *msg, size_t len, long n, int busy, uint32_t *lat,
		uint8_t *body, size_t cap)
{
	for (long i = 0; i < n; i++) {
		int64_t t0 = now_ns();
		size_t off = 0;
		int more = 1;

		while (off < len) {
			ssize_t w = send(fd, msg + off, len - off, MSG_NOSIGNAL);

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				return -1;
			off += (size_t)w;
		}
		while (more) {
			uint8_t head[9];
			uint64_t size;

			if (zmtp_read(fd, head, 2, busy, t0))
				return -1;
			size = head[1];
			if (head[0] & 0x02) {
				if (zmtp_read(fd, head + 2, 7, busy, t0))
					return -1;
				size = 0;
				for (int k = 1; k < 9; k++)
					size = size << 8 | head[k];
			}
			if (size > cap || zmtp_read(fd, body, (size_t)size, busy, t0))
				return -1;
			if (!(head[0] & 0x04))
				more = head[0] & 0x01;
		}
		lat[i] = (uint32_t)(now_ns() - t0);
	}
	return 0;
}

void tb_free(struct tb_ctx *c)
{
	if (!c)
		return;
	tb_frame_done(c);
	for (int i = 0; i < TB_MEMFDS; i++) {
		if (c->mem_fd[i] >= 0)
			close(c->mem_fd[i]);
		if (c->fdd_fd[i] >= 0)
			close(c->fdd_fd[i]);
	}
	for (int i = 0; i < RA_MAX; i++)
		free(c->ra[i].buf);
	free(c);
}

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
#include <time.h>
#include <unistd.h>

#define TB_ABI 2

/* struct seccomp_notif / seccomp_notif_resp (linux/seccomp.h, stable ABI) */
#define NOTIF_SIZE 80
#define IOC_RECV ((3u << 30) | (80u << 16) | ('!' << 8) | 0)
#define IOC_SEND ((3u << 30) | (24u << 16) | ('!' << 8) | 1)
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
#define TB_RCAP (1 << 18)   /* raw ZMTP: bytes read ahead before Python takes over */
#define OUT_HEAD 16         /* room for a ZMTP frame header before the CALL */

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
	/* private */
	int8_t kind[TB_NR_MAX], buf_arg[TB_NR_MAX], size_arg[TB_NR_MAX];
	int32_t mem_tid[TB_MEMFDS], mem_fd[TB_MEMFDS];
	zmq_msg_t msg;
	int msg_open;
	struct tb_record rec[TB_CAP];
	int64_t stage[TB_CAP][3];
	uint8_t out[OUT_HEAD + CALL_FIX + BUF_HEAD + TB_MAX_BUFFER + 8];
	uint8_t rb[TB_RCAP];
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
	c->rbuf = c->rb;
	c->outp = c->out;
	for (int i = 0; i < TB_MEMFDS; i++)
		c->mem_fd[i] = -1;
	return c;
}

/* kind 0: not served here; 1: no input buffer; 2: one buffer at buf_arg, length in size_arg */
int tb_set_kind(struct tb_ctx *c, int nr, int kind, int buf_arg, int size_arg)
{
	if (nr < 0 || nr >= TB_NR_MAX || kind < 0 || kind > 2 || buf_arg < 0 || buf_arg > 5 ||
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

/* Raw ZMTP: wait (poll, or spin with timeout 0) for the next part; as wait_reply's loop. */
static int raw_wait(struct tb_ctx *c, int64_t until, int *more)
{
	struct pollfd items[2] = {{(int)c->raw_fd, POLLIN, 0}, {(int)c->listener, POLLIN, 0}};
	int64_t deadline = c->t_send + c->wait_ns;

	for (;;) {
		int got = raw_part(c, more);

		if (got > 0)
			return TB_NONE;
		if (got < 0)
			return TB_INFLIGHT;
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
		int rc = poll(items, 2, ms);

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

/* Wait for the reply to call_id; TB_NONE once it is released and recorded. */
static int wait_reply(struct tb_ctx *c, uint64_t nid, int32_t tid, int16_t nr, int64_t until)
{
	zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {NULL, (int)c->listener, ZMQ_POLLIN, 0}};
	int64_t deadline = c->t_send + c->wait_ns;
	int64_t t_decoded;
	int rc;

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

/* Serve calls until one needs Python, the record buffer fills or slice_ns passed. */
int tb_forward(struct tb_ctx *c)
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
		if (nr < 0 || nr >= TB_NR_MAX || !c->kind[nr]) {
			if (nr == 59 || nr == 322) /* execve(at): a new address space follows */
				forget_mem(c, (int32_t)tid);
			return TB_TRAP;
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

		if (c->raw_fd >= 0) {
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
	for (int i = 0; i < TB_MEMFDS; i++)
		if (c->mem_fd[i] >= 0)
			close(c->mem_fd[i]);
	free(c);
}

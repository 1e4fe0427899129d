/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mktrace.h - declarations shared by the files of the mktrace module.
 *
 * main.c       module init/exit and parameters
 * hook.c       ftrace hooks on the __x64_sys_* entry points
 * session.c    sessions: target, forwarded set, configuration, statistics
 * relay_dev.c  /dev/mktrace and the relay-mode request/reply channel
 * kdelegate.c  the delegate kernel thread of kthread mode
 */
#ifndef MKTRACE_INTERNAL_H
#define MKTRACE_INTERNAL_H

#include <linux/atomic.h>
#include <linux/bitops.h>
#include <linux/hashtable.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/pid.h>
#include <linux/rcupdate.h>
#include <linux/refcount.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/wait.h>
#include <asm/unistd.h>

#include "include/uapi/mktrace.h"

struct pid_namespace;
struct pt_regs;
struct task_struct;

/* Syscall numbers the module can hook: [0, MKTRACE_NR_SYSCALLS). */
#define MKTRACE_NR_SYSCALLS	NR_syscalls

/* Buckets of the in-flight relay request table: 2^8. */
#define MKTRACE_INFLIGHT_BITS	8

/**
 * struct mktrace_kstat - per-syscall counters, updated without locks
 * @count: forwarded calls
 * @total_ns: summed forwarding time
 * @min_ns: shortest forwarding time, 0 before the first call
 * @max_ns: longest forwarding time
 * @released: calls released without a reply
 */
struct mktrace_kstat {
	atomic64_t count;
	atomic64_t total_ns;
	atomic64_t min_ns;
	atomic64_t max_ns;
	atomic64_t released;
};

/**
 * struct mktrace_verdict - what a hooked call does once forwarding is over
 * @action: MKTRACE_REPLY_CONTINUE (run the original handler) or
 *	MKTRACE_REPLY_RETURN (return @value without running it)
 * @value: return value for MKTRACE_REPLY_RETURN
 * @released: the call was released without a reply
 */
struct mktrace_verdict {
	u32 action;
	long value;
	bool released;
};

/**
 * struct mktrace_session - one open file of /dev/mktrace
 * @ref: references: the open file, plus one per call being forwarded
 * @node: entry in the RCU list of registered sessions
 * @rcu: frees the session after a grace period
 * @target: thread-group pid of the registered process, NULL before
 * @listed: @node is on the list of registered sessions
 * @set: forwarded syscall numbers (read locklessly by the hook)
 * @lock: protects @cfg, @dead, @next_seq, the request lists and counts,
 *	@ns and the record ring's indices
 * @cfg: configuration, copied by each call when it is trapped
 * @dead: the file was closed: no new request is queued
 * @next_seq: sequence number of the next relay request
 * @queue: relay requests not yet read
 * @inflight: relay requests read and awaiting a reply
 * @inflight_hash: the same requests by sequence number, for replies
 * @nqueued: entries on @queue
 * @ninflight: entries on @inflight
 * @readq: readers and pollers waiting for @queue or for call records
 * @ns: pid namespace of the opener (record tids), NULL once closed
 * @read_mutex: serialises readers of the record ring
 * @ring: kthread-mode call records for the reader (MKTRACE_KREC_RING),
 *	allocated when the session is first set to kthread mode
 * @ring_head: index of the oldest record in @ring
 * @ring_len: records in @ring
 * @dropped: records lost because @ring was full
 * @calls: forwarded calls
 * @released: calls released without a reply
 * @stats: per-syscall counters, indexed by syscall number
 */
struct mktrace_session {
	refcount_t ref;
	struct list_head node;
	struct rcu_head rcu;
	struct pid *target;
	bool listed;
	DECLARE_BITMAP(set, MKTRACE_MAX_SYSCALLS);
	spinlock_t lock;
	struct mktrace_config cfg;
	bool dead;
	u64 next_seq;
	struct list_head queue;
	struct list_head inflight;
	DECLARE_HASHTABLE(inflight_hash, MKTRACE_INFLIGHT_BITS);
	unsigned int nqueued;
	unsigned int ninflight;
	wait_queue_head_t readq;
	struct pid_namespace *ns;
	struct mutex read_mutex;
	struct mktrace_krecord *ring;
	unsigned int ring_head;
	unsigned int ring_len;
	u64 dropped;
	atomic64_t calls;
	atomic64_t released;
	struct mktrace_kstat stats[MKTRACE_NR_SYSCALLS];
};

/* main.c */
extern unsigned int mktrace_default_timeout_ms;
extern bool mktrace_kthread_faithful;
extern u64 mktrace_poll_ns;

/* hook.c */
int mktrace_hooks_init(void);
void mktrace_hooks_exit(void);
int mktrace_hooks_update(const unsigned long *old, const unsigned long *new);

/* session.c */
struct mktrace_session *mktrace_session_new(void);
void mktrace_session_close(struct mktrace_session *s, bool relay_died);
void mktrace_session_put(struct mktrace_session *s);
struct mktrace_session *mktrace_session_find(struct task_struct *task, unsigned int nr);
int mktrace_session_register(struct mktrace_session *s);
int mktrace_session_set_config(struct mktrace_session *s, const struct mktrace_config *cfg);
void mktrace_session_get_config(struct mktrace_session *s, struct mktrace_config *cfg);
int mktrace_session_set_syscalls(struct mktrace_session *s, const struct mktrace_syscall_set *set);
int mktrace_session_get_stats(struct mktrace_session *s, const struct mktrace_stats_query *q);
void mktrace_session_reset_stats(struct mktrace_session *s);
void mktrace_session_status(struct mktrace_session *s, struct mktrace_status *st);
void mktrace_forward(struct mktrace_session *s, unsigned int nr,
		     const struct pt_regs *uregs, struct mktrace_verdict *v);
ssize_t mktrace_session_read_records(struct mktrace_session *s, char __user *buf, size_t len,
				     bool nonblock);
bool mktrace_session_has_records(struct mktrace_session *s);

/* relay_dev.c */
int mktrace_dev_init(void);
void mktrace_dev_exit(void);
void mktrace_relay_forward(struct mktrace_session *s, unsigned int nr,
			   const struct pt_regs *uregs, u64 ts_ns,
			   const struct mktrace_config *cfg, struct mktrace_verdict *v);
void mktrace_relay_release_all(struct mktrace_session *s, bool relay_died);

/* kdelegate.c */
int mktrace_kdelegate_start(int cpu);
void mktrace_kdelegate_stop(void);
unsigned int mktrace_kdelegate_cpu(void);
void mktrace_kdelegate_forward(const struct mktrace_config *cfg, struct mktrace_krecord *rec,
			       struct mktrace_verdict *v);

#endif /* MKTRACE_INTERNAL_H */

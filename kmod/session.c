// SPDX-License-Identifier: GPL-2.0
/*
 * session.c - mktrace sessions: one per open file of /dev/mktrace.
 *
 * A session holds the registered target (a thread group, optionally with
 * its descendants), the forwarded syscall set, the configuration and the
 * per-syscall statistics.  Registered sessions sit on an RCU list that the
 * ftrace callback walks to decide whether a call is forwarded; a session is
 * freed after a grace period once the file is closed and the last
 * forwarded call holding a reference has returned.
 *
 * Only tasks with no_new_privs are ever forwarded (REGISTER requires it of
 * the target, and children inherit it), so a traced process cannot gain
 * privileges through a set-uid/set-gid execve while its calls are hooked.
 * In kthread mode every forwarded call leaves a struct mktrace_krecord in the
 * session's ring, which the launcher drains with read(2).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/pid_namespace.h>
#include <linux/poll.h>
#include <linux/rculist.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "mktrace.h"

/* Ancestors looked at when matching descendants of a target. */
#define MKTRACE_MAX_DEPTH	64

static LIST_HEAD(mktrace_sessions);
/* Serialises registration and forwarded-set changes of all sessions. */
static DEFINE_MUTEX(mktrace_session_mutex);

/**
 * mktrace_session_new() - allocate a session with the default configuration
 *
 * Return: the session holding one reference (the open file's), or NULL.
 */
struct mktrace_session *mktrace_session_new(void)
{
	struct mktrace_session *s = kvzalloc(sizeof(*s), GFP_KERNEL);

	if (!s)
		return NULL;
	refcount_set(&s->ref, 1);
	INIT_LIST_HEAD(&s->node);
	spin_lock_init(&s->lock);
	INIT_LIST_HEAD(&s->queue);
	INIT_LIST_HEAD(&s->inflight);
	hash_init(s->inflight_hash);
	init_waitqueue_head(&s->readq);
	mutex_init(&s->read_mutex);
	s->ns = get_pid_ns(task_active_pid_ns(current));
	s->cfg.mode = MKTRACE_MODE_KTHREAD;
	if (READ_ONCE(mktrace_kthread_faithful))
		s->cfg.flags = MKTRACE_F_FAITHFUL;
	s->cfg.timeout_ns = (u64)mktrace_default_timeout_ms * NSEC_PER_MSEC;
	s->cfg.release_action = MKTRACE_ACT_CONTINUE;
	return s;
}

static void mktrace_session_free_rcu(struct rcu_head *rcu)
{
	struct mktrace_session *s = container_of(rcu, struct mktrace_session, rcu);

	put_pid(s->target);
	kvfree(s->ring);
	kvfree(s);
}

/**
 * mktrace_session_put() - drop a reference, freeing the session at zero
 * @s: the session
 */
void notrace mktrace_session_put(struct mktrace_session *s)
{
	if (refcount_dec_and_test(&s->ref))
		call_rcu(&s->rcu, mktrace_session_free_rcu);
}

/**
 * mktrace_session_close() - end a session when its file is released
 * @s: the session; the file's reference is dropped
 * @relay_died: released by an exiting task (see mktrace_relay_release_all())
 *
 * Unhooks its syscalls, takes it off the list so no new call is trapped,
 * then releases every pending relay request.
 */
void mktrace_session_close(struct mktrace_session *s, bool relay_died)
{
	DECLARE_BITMAP(none, MKTRACE_MAX_SYSCALLS);
	struct pid_namespace *ns;

	bitmap_zero(none, MKTRACE_MAX_SYSCALLS);
	mutex_lock(&mktrace_session_mutex);
	if (s->listed) {
		list_del_rcu(&s->node);
		s->listed = false;
	}
	/* Removing hooks cannot fail. */
	mktrace_hooks_update(s->set, none);
	bitmap_zero(s->set, MKTRACE_MAX_SYSCALLS);
	mutex_unlock(&mktrace_session_mutex);

	mktrace_relay_release_all(s, relay_died);
	/* Calls still returning record nothing from now on. */
	spin_lock(&s->lock);
	ns = s->ns;
	s->ns = NULL;
	spin_unlock(&s->lock);
	put_pid_ns(ns);
	mktrace_session_put(s);
}

/* Called under rcu_read_lock(). */
static bool notrace mktrace_traces(struct mktrace_session *s, struct task_struct *t)
{
	struct pid *target = READ_ONCE(s->target);
	int depth;

	if (task_tgid(t) == target)
		return true;
	if (!(READ_ONCE(s->cfg.flags) & MKTRACE_F_DESCENDANTS))
		return false;
	for (depth = 0; depth < MKTRACE_MAX_DEPTH; depth++) {
		struct task_struct *parent = rcu_dereference(t->real_parent);

		if (!parent || parent == t || !parent->pid)
			return false;
		if (task_tgid(parent) == target)
			return true;
		if (is_global_init(parent))
			return false;
		t = parent;
	}
	return false;
}

/**
 * mktrace_session_find() - the session forwarding syscall @nr of @task
 * @task: the calling task (current)
 * @nr: syscall number
 *
 * Called from the ftrace callback (preemption disabled).
 *
 * Return: a referenced session, or NULL if the call is not forwarded.
 */
notrace struct mktrace_session *mktrace_session_find(struct task_struct *task,
						      unsigned int nr)
{
	struct mktrace_session *s, *found = NULL;

	if (!task_no_new_privs(task))
		return NULL;
	rcu_read_lock();
	list_for_each_entry_rcu(s, &mktrace_sessions, node) {
		if (!test_bit(nr, s->set) || !mktrace_traces(s, task))
			continue;
		if (refcount_inc_not_zero(&s->ref))
			found = s;
		break;
	}
	rcu_read_unlock();
	return found;
}

/**
 * mktrace_session_register() - make the calling process the session's target
 * @s: the session
 *
 * Return: 0, -EPERM if the caller lacks no_new_privs, -EBUSY if the session
 * already has a target or the process is already traced by another session
 * (as its target or as a descendant of its target).
 */
int mktrace_session_register(struct mktrace_session *s)
{
	struct pid *tgid = task_tgid(current);
	struct mktrace_session *other;
	int err = 0;

	if (!task_no_new_privs(current))
		return -EPERM;
	mutex_lock(&mktrace_session_mutex);
	if (s->target) {
		err = -EBUSY;
		goto out;
	}
	rcu_read_lock();
	list_for_each_entry(other, &mktrace_sessions, node) {
		if (mktrace_traces(other, current)) {
			err = -EBUSY;
			break;
		}
	}
	rcu_read_unlock();
	if (err)
		goto out;
	WRITE_ONCE(s->target, get_pid(tgid));
	list_add_tail_rcu(&s->node, &mktrace_sessions);
	s->listed = true;
out:
	mutex_unlock(&mktrace_session_mutex);
	return err;
}

/**
 * mktrace_session_set_config() - validate and apply a configuration
 * @s: the session
 * @cfg: the new configuration
 *
 * Kthread mode allocates the session's record ring on first use.
 *
 * Return: 0, -EINVAL if any field is out of range, -ENOMEM.
 */
int mktrace_session_set_config(struct mktrace_session *s, const struct mktrace_config *cfg)
{
	struct mktrace_krecord *ring;

	if (cfg->mode != MKTRACE_MODE_KTHREAD && cfg->mode != MKTRACE_MODE_RELAY)
		return -EINVAL;
	if (cfg->flags & ~MKTRACE_F_ALL || cfg->reserved)
		return -EINVAL;
	if (cfg->delay_ns > MKTRACE_MAX_DELAY_NS)
		return -EINVAL;
	if (cfg->timeout_ns < MKTRACE_MIN_TIMEOUT_NS || cfg->timeout_ns > MKTRACE_MAX_TIMEOUT_NS)
		return -EINVAL;
	if (cfg->release_action != MKTRACE_ACT_CONTINUE && cfg->release_action != MKTRACE_ACT_EIO)
		return -EINVAL;
	if ((cfg->flags & MKTRACE_F_FLUSH_CALLER) && !(cfg->flags & MKTRACE_F_FAITHFUL))
		return -EINVAL;
	if (cfg->mode == MKTRACE_MODE_KTHREAD && !READ_ONCE(s->ring)) {
		ring = kvmalloc_array(MKTRACE_KREC_RING, sizeof(*ring), GFP_KERNEL);
		if (!ring)
			return -ENOMEM;
		if (cmpxchg(&s->ring, NULL, ring))
			kvfree(ring);
	}
	spin_lock(&s->lock);
	s->cfg = *cfg;
	spin_unlock(&s->lock);
	return 0;
}

/**
 * mktrace_session_get_config() - copy out the configuration
 * @s: the session
 * @cfg: filled in
 */
void mktrace_session_get_config(struct mktrace_session *s, struct mktrace_config *cfg)
{
	spin_lock(&s->lock);
	*cfg = s->cfg;
	spin_unlock(&s->lock);
}

/**
 * mktrace_session_set_syscalls() - replace the forwarded set
 * @s: the session
 * @set: the new set
 *
 * Return: 0, or -EINVAL if a number is past the syscall table or names no
 * hookable handler (then the old set stays in force).
 */
int mktrace_session_set_syscalls(struct mktrace_session *s, const struct mktrace_syscall_set *set)
{
	DECLARE_BITMAP(new, MKTRACE_MAX_SYSCALLS);
	int err;

	/* x86-64 only: a long is a __u64, bit order matches. */
	BUILD_BUG_ON(BITS_PER_LONG != 64 || sizeof(new) != sizeof(set->bits));
	memcpy(new, set->bits, sizeof(new));
	if (find_next_bit(new, MKTRACE_MAX_SYSCALLS, MKTRACE_NR_SYSCALLS) < MKTRACE_MAX_SYSCALLS)
		return -EINVAL;
	mutex_lock(&mktrace_session_mutex);
	err = mktrace_hooks_update(s->set, new);
	if (!err)
		bitmap_copy(s->set, new, MKTRACE_MAX_SYSCALLS);
	mutex_unlock(&mktrace_session_mutex);
	return err;
}

/**
 * mktrace_session_get_stats() - copy per-syscall statistics to userspace
 * @s: the session
 * @q: where to and how many entries
 *
 * Return: 0, -EINVAL for a bad query, -EFAULT for a bad buffer.
 */
int mktrace_session_get_stats(struct mktrace_session *s, const struct mktrace_stats_query *q)
{
	struct mktrace_stat __user *ubuf = u64_to_user_ptr(q->buf);
	struct mktrace_stat st;
	unsigned int nr;

	if (q->reserved || q->count > MKTRACE_MAX_SYSCALLS)
		return -EINVAL;
	for (nr = 0; nr < q->count; nr++) {
		memset(&st, 0, sizeof(st));
		if (nr < MKTRACE_NR_SYSCALLS) {
			struct mktrace_kstat *k = &s->stats[nr];

			st.count = atomic64_read(&k->count);
			st.total_ns = atomic64_read(&k->total_ns);
			st.min_ns = atomic64_read(&k->min_ns);
			st.max_ns = atomic64_read(&k->max_ns);
			st.released = atomic64_read(&k->released);
		}
		if (copy_to_user(&ubuf[nr], &st, sizeof(st)))
			return -EFAULT;
	}
	return 0;
}

/**
 * mktrace_session_reset_stats() - zero the statistics
 * @s: the session
 */
void mktrace_session_reset_stats(struct mktrace_session *s)
{
	unsigned int nr;

	for (nr = 0; nr < MKTRACE_NR_SYSCALLS; nr++) {
		atomic64_set(&s->stats[nr].count, 0);
		atomic64_set(&s->stats[nr].total_ns, 0);
		atomic64_set(&s->stats[nr].min_ns, 0);
		atomic64_set(&s->stats[nr].max_ns, 0);
		atomic64_set(&s->stats[nr].released, 0);
	}
	atomic64_set(&s->calls, 0);
	atomic64_set(&s->released, 0);
}

/**
 * mktrace_session_status() - summarise the session for userspace
 * @s: the session
 * @st: filled in
 */
void mktrace_session_status(struct mktrace_session *s, struct mktrace_status *st)
{
	struct task_struct *t;

	memset(st, 0, sizeof(*st));
	st->abi_version = MKTRACE_ABI_VERSION;
	st->nr_syscalls = MKTRACE_NR_SYSCALLS;
	mutex_lock(&mktrace_session_mutex);
	if (s->target) {
		st->target_pid = pid_vnr(s->target);
		rcu_read_lock();
		t = pid_task(s->target, PIDTYPE_TGID);
		st->target_alive = t && !(t->exit_state && thread_group_empty(t));
		rcu_read_unlock();
	}
	mutex_unlock(&mktrace_session_mutex);
	spin_lock(&s->lock);
	st->queued = s->nqueued;
	st->inflight = s->ninflight;
	st->dropped = s->dropped;
	spin_unlock(&s->lock);
	st->calls = atomic64_read(&s->calls);
	st->released = atomic64_read(&s->released);
	st->delegate_cpu = mktrace_kdelegate_cpu();
}

static void mktrace_stat_add(struct mktrace_session *s, unsigned int nr, u64 ns, bool released)
{
	struct mktrace_kstat *k = &s->stats[nr];
	s64 max = atomic64_read(&k->max_ns);
	s64 min = atomic64_read(&k->min_ns);

	ns = max_t(u64, ns, 1);		/* min_ns == 0 means "no call yet" */
	atomic64_inc(&k->count);
	atomic64_add(ns, &k->total_ns);
	while ((s64)ns > max) {
		s64 seen = atomic64_cmpxchg(&k->max_ns, max, ns);

		if (seen == max)
			break;
		max = seen;
	}
	while (!min || (s64)ns < min) {
		s64 seen = atomic64_cmpxchg(&k->min_ns, min, ns);

		if (seen == min)
			break;
		min = seen;
	}
	atomic64_inc(&s->calls);
	if (released) {
		atomic64_inc(&k->released);
		atomic64_inc(&s->released);
	}
}

static void mktrace_record_push(struct mktrace_session *s, struct mktrace_krecord *rec);

/**
 * mktrace_forward() - forward one trapped call according to the session mode
 * @s: the session tracing the caller
 * @nr: syscall number
 * @uregs: the caller's user registers (arguments)
 * @v: filled in with what the call does next
 *
 * Runs in the caller's syscall context and may sleep.
 */
void mktrace_forward(struct mktrace_session *s, unsigned int nr,
		     const struct pt_regs *uregs, struct mktrace_verdict *v)
{
	u64 t0 = ktime_get_ns();
	struct mktrace_krecord rec;
	struct mktrace_config cfg;

	mktrace_session_get_config(s, &cfg);
	v->action = MKTRACE_REPLY_CONTINUE;
	v->value = 0;
	v->released = false;
	if (cfg.mode == MKTRACE_MODE_RELAY) {
		mktrace_relay_forward(s, nr, uregs, t0, &cfg, v);
		mktrace_stat_add(s, nr, ktime_get_ns() - t0, v->released);
		return;
	}
	memset(&rec, 0, sizeof(rec));
	rec.nr = nr;
	rec.cpu = raw_smp_processor_id();
	rec.ts_trap = t0;
	mktrace_kdelegate_forward(&cfg, &rec, v);
	rec.ts_resume = ktime_get_ns();
	mktrace_stat_add(s, nr, rec.ts_resume - t0, v->released);
	mktrace_record_push(s, &rec);
}

/* Append a kthread-mode record for the reader; counted as dropped if full. */
static void mktrace_record_push(struct mktrace_session *s, struct mktrace_krecord *rec)
{
	bool added = false;

	spin_lock(&s->lock);
	if (s->ring && s->ns && s->ring_len < MKTRACE_KREC_RING) {
		rec->tid = task_pid_nr_ns(current, s->ns);
		s->ring[(s->ring_head + s->ring_len) % MKTRACE_KREC_RING] = *rec;
		s->ring_len++;
		added = true;
	} else if (s->ns) {
		s->dropped++;	/* full, or never set to kthread mode (no ring) */
	}
	spin_unlock(&s->lock);
	if (added && wq_has_sleeper(&s->readq))
		wake_up_interruptible_poll(&s->readq, EPOLLIN | EPOLLRDNORM);
}

/**
 * mktrace_session_has_records() - whether kthread-mode records await the reader
 * @s: the session
 *
 * Return: true if read(2) would return at least one record.
 */
bool mktrace_session_has_records(struct mktrace_session *s)
{
	return READ_ONCE(s->ring_len) != 0;
}

/* Records copied out per batch of mktrace_session_read_records(). */
#define MKTRACE_READ_BATCH	64

/**
 * mktrace_session_read_records() - read(2) of a kthread-mode session
 * @s: the session
 * @buf: user buffer
 * @len: its length; as many whole records as fit are returned
 * @nonblock: return -EAGAIN instead of waiting when no record is there
 *
 * Records are removed only once copied out, so a fault loses none.
 *
 * Return: bytes copied, -EINVAL for a buffer shorter than one record,
 * -EAGAIN, -EFAULT, or -ERESTARTSYS when a wait is interrupted.
 */
ssize_t mktrace_session_read_records(struct mktrace_session *s, char __user *buf, size_t len,
				     bool nonblock)
{
	struct mktrace_krecord *batch;
	size_t want = len / sizeof(*batch), done = 0;
	unsigned int i, n;
	ssize_t err = 0;

	if (!want)
		return -EINVAL;
	batch = kmalloc_array(MKTRACE_READ_BATCH, sizeof(*batch), GFP_KERNEL);
	if (!batch)
		return -ENOMEM;
	mutex_lock(&s->read_mutex);
	while (!READ_ONCE(s->ring_len)) {
		if (nonblock || READ_ONCE(s->dead)) {
			err = -EAGAIN;
			goto out;
		}
		mutex_unlock(&s->read_mutex);
		err = wait_event_interruptible(s->readq, READ_ONCE(s->ring_len) || READ_ONCE(s->dead));
		mutex_lock(&s->read_mutex);
		if (err)
			goto out;
	}
	while (done < want) {
		spin_lock(&s->lock);
		n = min_t(size_t, min_t(size_t, s->ring_len, MKTRACE_READ_BATCH), want - done);
		for (i = 0; i < n; i++)
			batch[i] = s->ring[(s->ring_head + i) % MKTRACE_KREC_RING];
		spin_unlock(&s->lock);
		if (!n)
			break;
		if (copy_to_user(buf + done * sizeof(*batch), batch, n * sizeof(*batch))) {
			err = -EFAULT;
			break;
		}
		/* Only this reader (read_mutex) removes records. */
		spin_lock(&s->lock);
		s->ring_head = (s->ring_head + n) % MKTRACE_KREC_RING;
		s->ring_len -= n;
		spin_unlock(&s->lock);
		done += n;
	}
out:
	mutex_unlock(&s->read_mutex);
	kfree(batch);
	return done ? done * sizeof(*batch) : err;
}

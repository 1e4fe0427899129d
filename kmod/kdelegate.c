// SPDX-License-Identifier: GPL-2.0
/*
 * kdelegate.c - the delegate kernel thread of kthread mode.
 *
 * The paper's mktrace handed each forwarded call to a kernel thread on
 * another CPU that spun for the forwarding delay.  Here a caller queues a
 * request on its stack, wakes the thread "mktrace/N" (pinned to CPU N) and
 * waits; the thread spins delay_ns for the way to the delegate and
 * delay_ns for the way back, then completes the request.  The caller then
 * runs the original handler in its own context: no borrowed mm or
 * credentials, no TLB flush.  What a call costs beyond 2 * delay_ns is the
 * handoff.
 *
 * Both sides poll before they sleep, as a shared-memory delegation channel
 * would: the thread looks for new work for poll_us after each request, the
 * caller spins for its reply for 2 * delay_ns + poll_us.  Only then do they
 * fall back to a wait queue / completion (wake-ups cost several µs on
 * hardware and milliseconds under QEMU TCG).  poll_us=0 disables polling.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/completion.h>
#include <linux/cpumask.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/spinlock.h>
#include <linux/wait.h>

#include "mktrace.h"

/**
 * struct mktrace_kreq - a call handed to the delegate thread
 * @node: entry on the delegate's queue
 * @done: completed by the delegate after the round trip
 * @delay_ns: spin per leg
 * @taken: the delegate dequeued it (under mktrace_kd.lock)
 */
struct mktrace_kreq {
	struct list_head node;
	struct completion done;
	u64 delay_ns;
	bool taken;
};

static struct {
	struct task_struct *task;
	unsigned int cpu;
	spinlock_t lock;
	struct list_head queue;
	wait_queue_head_t wq;
} mktrace_kd = {
	.lock = __SPIN_LOCK_UNLOCKED(mktrace_kd.lock),
	.queue = LIST_HEAD_INIT(mktrace_kd.queue),
	.wq = __WAIT_QUEUE_HEAD_INITIALIZER(mktrace_kd.wq),
};

static void mktrace_spin(u64 ns)
{
	u64 end = ktime_get_ns() + ns;

	while (ktime_get_ns() < end) {
		cpu_relax();
		cond_resched();
	}
}

/* Spin until the delegate completed @r; false on timeout or fatal signal. */
static bool mktrace_kd_poll_done(struct mktrace_kreq *r, u64 budget_ns)
{
	u64 end = ktime_get_ns() + budget_ns;

	while (!completion_done(&r->done)) {
		if (fatal_signal_pending(current) || ktime_get_ns() > end)
			return false;
		cpu_relax();
		cond_resched();
	}
	return true;
}

static struct mktrace_kreq *mktrace_kd_next(void)
{
	struct mktrace_kreq *r;

	spin_lock(&mktrace_kd.lock);
	r = list_first_entry_or_null(&mktrace_kd.queue, struct mktrace_kreq, node);
	if (r) {
		list_del(&r->node);
		r->taken = true;
	}
	spin_unlock(&mktrace_kd.lock);
	return r;
}

static int mktrace_kd_main(void *unused)
{
	struct mktrace_kreq *r;
	u64 idle_since;

	while (!kthread_should_stop()) {
		wait_event_interruptible(mktrace_kd.wq, !list_empty_careful(&mktrace_kd.queue) ||
					 kthread_should_stop());
		idle_since = ktime_get_ns();
		while (!kthread_should_stop()) {
			r = mktrace_kd_next();
			if (r) {
				mktrace_spin(r->delay_ns);	/* caller -> delegate */
				mktrace_spin(r->delay_ns);	/* delegate -> caller */
				complete(&r->done);
				idle_since = ktime_get_ns();
				continue;
			}
			if (ktime_get_ns() - idle_since >= mktrace_poll_ns)
				break;
			cpu_relax();
			cond_resched();
		}
	}
	return 0;
}

/**
 * mktrace_kdelegate_forward() - round trip through the delegate thread
 * @delay_ns: spin per leg
 * @v: set to "continue locally", or "return -EINTR" after a fatal signal
 *	that arrived before the delegate took the call
 */
void mktrace_kdelegate_forward(u64 delay_ns, struct mktrace_verdict *v)
{
	struct mktrace_kreq r = { .delay_ns = delay_ns };
	bool dequeued = false;

	init_completion(&r.done);
	spin_lock(&mktrace_kd.lock);
	list_add_tail(&r.node, &mktrace_kd.queue);
	spin_unlock(&mktrace_kd.lock);
	wake_up(&mktrace_kd.wq);

	if (mktrace_poll_ns && mktrace_kd_poll_done(&r, 2 * delay_ns + mktrace_poll_ns))
		return;
	if (!wait_for_completion_killable(&r.done))
		return;
	spin_lock(&mktrace_kd.lock);
	if (!r.taken) {
		list_del(&r.node);
		dequeued = true;
	}
	spin_unlock(&mktrace_kd.lock);
	if (!dequeued) {
		/* The delegate holds it: bounded by 2 * MKTRACE_MAX_DELAY_NS. */
		wait_for_completion(&r.done);
		return;
	}
	v->action = MKTRACE_REPLY_RETURN;
	v->value = -EINTR;
	v->released = true;
}

/**
 * mktrace_kdelegate_start() - create the delegate thread
 * @cpu: CPU to pin it to, or -1 for the last online CPU
 *
 * Return: 0, -EINVAL for an offline CPU, or the kthread_create() error.
 */
int mktrace_kdelegate_start(int cpu)
{
	struct task_struct *t;

	if (cpu < 0)
		cpu = cpumask_last(cpu_online_mask);
	if (cpu >= nr_cpu_ids || !cpu_online(cpu)) {
		pr_err("delegate_cpu=%d is not an online CPU\n", cpu);
		return -EINVAL;
	}
	t = kthread_create(mktrace_kd_main, NULL, "mktrace/%d", cpu);
	if (IS_ERR(t)) {
		pr_err("cannot create the delegate thread: %ld\n", PTR_ERR(t));
		return PTR_ERR(t);
	}
	kthread_bind(t, cpu);
	mktrace_kd.task = t;
	mktrace_kd.cpu = cpu;
	wake_up_process(t);
	pr_info("delegate thread pinned to CPU %d\n", cpu);
	return 0;
}

/**
 * mktrace_kdelegate_stop() - stop the delegate thread (no session is left)
 */
void mktrace_kdelegate_stop(void)
{
	kthread_stop(mktrace_kd.task);
}

/**
 * mktrace_kdelegate_cpu() - the CPU the delegate thread is pinned to
 *
 * Return: the CPU number.
 */
unsigned int mktrace_kdelegate_cpu(void)
{
	return mktrace_kd.cpu;
}

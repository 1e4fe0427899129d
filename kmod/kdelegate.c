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
 * The mktrace-faithful variant (MKTRACE_F_FAITHFUL) does what the original's
 * HANDLE_UP/HANDLE_BOT did around each call: the thread switches to the
 * caller's mm (kthread_use_mm) and flushes its CPU's TLB (__flush_tlb_all,
 * global entries included) before the leg to the delegate, and after the leg
 * back drops the mm (kthread_unuse_mm) and flushes again.  With
 * MKTRACE_F_FLUSH_CALLER the caller also flushes its own CPU's TLB before
 * queuing the call and after it is released.  (flush_tlb_all(), the all-CPU
 * flush, is not exported to modules; __flush_tlb_all() is.)
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
#include <linux/mm_types.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <asm/tlbflush.h>

#include "mktrace.h"

/**
 * struct mktrace_kreq - a call handed to the delegate thread
 * @node: entry on the delegate's queue
 * @done: completed by the delegate after the round trip
 * @delay_ns: spin per leg
 * @mm: faithful variant: the caller's mm to borrow, else NULL (the caller
 *	waits until @done, so its mm outlives the borrowing)
 * @rec: the caller's record; the delegate fills in ts_taken, ts_arrive and
 *	ts_done before completing @done
 * @taken: the delegate dequeued it (under mktrace_kd.lock)
 */
struct mktrace_kreq {
	struct list_head node;
	struct completion done;
	u64 delay_ns;
	struct mm_struct *mm;
	struct mktrace_krecord *rec;
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

/* __flush_tlb_all() flushes this CPU only and must not be preempted. */
static void mktrace_flush_this_cpu(void)
{
	preempt_disable();
	__flush_tlb_all();
	preempt_enable();
}

/* One round trip of @r on the delegate thread; @r is gone once completed. */
static void mktrace_kd_serve(struct mktrace_kreq *r)
{
	struct mktrace_krecord *rec = r->rec;

	rec->ts_taken = ktime_get_ns();
	if (r->mm) {
		kthread_use_mm(r->mm);
		mktrace_flush_this_cpu();
	}
	mktrace_spin(r->delay_ns);	/* caller -> delegate */
	rec->ts_arrive = ktime_get_ns();
	mktrace_spin(r->delay_ns);	/* delegate -> caller */
	if (r->mm) {
		kthread_unuse_mm(r->mm);
		mktrace_flush_this_cpu();
	}
	rec->ts_done = ktime_get_ns();
	complete(&r->done);
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
				mktrace_kd_serve(r);
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

/* Wait for the delegate; false if a fatal signal came before it took @r. */
static bool mktrace_kd_wait(struct mktrace_kreq *r)
{
	bool dequeued = false;

	if (mktrace_poll_ns && mktrace_kd_poll_done(r, 2 * r->delay_ns + mktrace_poll_ns))
		return true;
	if (!wait_for_completion_killable(&r->done))
		return true;
	spin_lock(&mktrace_kd.lock);
	if (!r->taken) {
		list_del(&r->node);
		dequeued = true;
	}
	spin_unlock(&mktrace_kd.lock);
	if (dequeued)
		return false;
	/* The delegate holds it: bounded by 2 * MKTRACE_MAX_DELAY_NS. */
	wait_for_completion(&r->done);
	return true;
}

/**
 * mktrace_kdelegate_forward() - round trip through the delegate thread
 * @cfg: the session's configuration (delay_ns, MKTRACE_F_FAITHFUL,
 *	MKTRACE_F_FLUSH_CALLER)
 * @rec: the call's record: ts_queued and the delegate's stamps are filled
 *	in, and its flags
 * @v: set to "continue locally", or "return -EINTR" after a fatal signal
 *	that arrived before the delegate took the call
 */
void mktrace_kdelegate_forward(const struct mktrace_config *cfg, struct mktrace_krecord *rec,
			       struct mktrace_verdict *v)
{
	bool faithful = (cfg->flags & MKTRACE_F_FAITHFUL) && current->mm;
	bool flush_caller = faithful && (cfg->flags & MKTRACE_F_FLUSH_CALLER);
	struct mktrace_kreq r = {
		.delay_ns = cfg->delay_ns,
		.mm = faithful ? current->mm : NULL,
		.rec = rec,
	};

	if (faithful)
		rec->flags |= MKTRACE_KREC_FAITHFUL;
	if (flush_caller)
		mktrace_flush_this_cpu();
	init_completion(&r.done);
	rec->ts_queued = ktime_get_ns();
	spin_lock(&mktrace_kd.lock);
	list_add_tail(&r.node, &mktrace_kd.queue);
	spin_unlock(&mktrace_kd.lock);
	wake_up(&mktrace_kd.wq);

	if (!mktrace_kd_wait(&r)) {
		rec->flags |= MKTRACE_KREC_RELEASED;
		v->action = MKTRACE_REPLY_RETURN;
		v->value = -EINTR;
		v->released = true;
		return;
	}
	if (flush_caller)
		mktrace_flush_this_cpu();
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

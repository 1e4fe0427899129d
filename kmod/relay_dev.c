// SPDX-License-Identifier: GPL-2.0
/*
 * relay_dev.c - /dev/mktrace: control ioctls and the relay-mode channel.
 *
 * Each open file is a session (session.c).  In relay mode a forwarded call
 * queues a struct mktrace_call on the caller's stack and sleeps (killable,
 * with the session's timeout); read(2) moves one request from the queue to
 * the in-flight list and returns its struct mktrace_request; write(2) of a
 * struct mktrace_reply takes the request off the in-flight list and wakes
 * the caller.  Whoever takes a call off the lists does so under the session
 * lock and completes it there, so the caller's stack frame stays valid.
 * In-flight requests are also hashed by sequence number, so a reply finds
 * its call in O(1) however many are in flight.  In kthread mode read(2)
 * returns the session's call records instead (session.c).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/completion.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/jiffies.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/pid_namespace.h>
#include <linux/poll.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/uaccess.h>

#include "mktrace.h"

/* A caller re-arms its wait this often (keeps the hung-task detector quiet). */
#define MKTRACE_WAIT_CHUNK	(10 * HZ)
/* Kernel-internal restart codes a relay must not return to userspace. */
#define MKTRACE_ERESTART_FIRST	512
#define MKTRACE_ERESTART_LAST	529

/**
 * struct mktrace_call - a relay-mode call waiting for its reply
 * @node: entry on the session's queue or in-flight list
 * @hnode: entry in the session's in-flight hash table while @sent
 * @done: completed, under the session lock, once the call is answered
 * @task: the calling task
 * @req: the request record (pid/tid are filled in when it is read)
 * @sent: @node is on the in-flight list (else on the queue)
 * @answered: the call is off the lists and @action/@value are set
 * @released: answered without a reply from the relay
 * @action: MKTRACE_REPLY_*
 * @value: return value for MKTRACE_REPLY_RETURN
 */
struct mktrace_call {
	struct list_head node;
	struct hlist_node hnode;
	struct completion done;
	struct task_struct *task;
	struct mktrace_request req;
	bool sent;
	bool answered;
	bool released;
	u32 action;
	s64 value;
};

/* Called with s->lock held: take @c off its list and set its verdict. */
static void mktrace_call_answer(struct mktrace_session *s, struct mktrace_call *c,
				u32 action, s64 value, bool released)
{
	list_del(&c->node);
	if (c->sent) {
		hash_del(&c->hnode);
		s->ninflight--;
	} else {
		s->nqueued--;
	}
	c->answered = true;
	c->released = released;
	c->action = action;
	c->value = value;
	complete(&c->done);
}

/* Called with s->lock held: answer @c as the configuration says. */
static void mktrace_call_release(struct mktrace_session *s, struct mktrace_call *c)
{
	if (s->cfg.release_action == MKTRACE_ACT_EIO)
		mktrace_call_answer(s, c, MKTRACE_REPLY_RETURN, -EIO, true);
	else
		mktrace_call_answer(s, c, MKTRACE_REPLY_CONTINUE, 0, true);
}

/**
 * mktrace_relay_forward() - hand a call to the userspace relay and wait
 * @s: the session
 * @nr: syscall number
 * @uregs: the caller's user registers
 * @ts_ns: CLOCK_MONOTONIC time the call was trapped
 * @cfg: the session's configuration when the call was trapped
 * @v: filled in with the relay's verdict
 *
 * Returns when the relay replied, the session was closed, the timeout
 * expired or a fatal signal arrived (then the call fails with -EINTR and the
 * task dies on its way out).
 */
void mktrace_relay_forward(struct mktrace_session *s, unsigned int nr,
			   const struct pt_regs *uregs, u64 ts_ns,
			   const struct mktrace_config *cfg, struct mktrace_verdict *v)
{
	struct mktrace_call c = { .task = current };
	unsigned long left = nsecs_to_jiffies(cfg->timeout_ns) + 1;
	long r = 0;

	init_completion(&c.done);
	c.req.nr = nr;
	c.req.args[0] = uregs->di;
	c.req.args[1] = uregs->si;
	c.req.args[2] = uregs->dx;
	c.req.args[3] = uregs->r10;
	c.req.args[4] = uregs->r8;
	c.req.args[5] = uregs->r9;
	c.req.ts_ns = ts_ns;

	spin_lock(&s->lock);
	if (s->dead) {
		list_add(&c.node, &s->queue);
		s->nqueued++;
		mktrace_call_release(s, &c);
	} else {
		c.req.seq = ++s->next_seq;
		list_add_tail(&c.node, &s->queue);
		s->nqueued++;
	}
	spin_unlock(&s->lock);
	wake_up_interruptible_poll(&s->readq, EPOLLIN | EPOLLRDNORM);

	while (left) {
		unsigned long chunk = min_t(unsigned long, left, MKTRACE_WAIT_CHUNK);

		r = wait_for_completion_killable_timeout(&c.done, chunk);
		if (r)
			break;
		left -= chunk;
	}

	spin_lock(&s->lock);
	if (!c.answered) {
		if (r < 0)
			mktrace_call_answer(s, &c, MKTRACE_REPLY_RETURN, -EINTR, true);
		else
			mktrace_call_release(s, &c);
	}
	spin_unlock(&s->lock);
	v->action = c.action;
	v->value = c.value;
	v->released = c.released;
}

/*
 * Called with s->lock held: end @c for a relay that died with it pending.
 * The caller gets SIGKILL before it can wake (it re-takes s->lock before
 * returning, so @c is alive here) and its call fails with -EINTR: it never
 * runs on after its relay, however late the parent-death signal comes.
 */
static void mktrace_call_kill(struct mktrace_session *s, struct mktrace_call *c)
{
	send_sig(SIGKILL, c->task, 1);
	mktrace_call_answer(s, c, MKTRACE_REPLY_RETURN, -EINTR, true);
}

/**
 * mktrace_relay_release_all() - release every pending call of a closing session
 * @s: the session
 * @relay_died: the file is released by an exiting task (the relay died or
 *	exited with the device open): pending callers are killed; otherwise
 *	(an explicit close) they are released by the session's release_action
 */
void mktrace_relay_release_all(struct mktrace_session *s, bool relay_died)
{
	struct mktrace_call *c, *tmp;
	void (*end)(struct mktrace_session *, struct mktrace_call *) =
		relay_died ? mktrace_call_kill : mktrace_call_release;

	spin_lock(&s->lock);
	s->dead = true;
	list_for_each_entry_safe(c, tmp, &s->queue, node)
		end(s, c);
	list_for_each_entry_safe(c, tmp, &s->inflight, node)
		end(s, c);
	spin_unlock(&s->lock);
	wake_up_interruptible_all(&s->readq);
}

/* Called with s->lock held. */
static struct mktrace_call *mktrace_find_inflight(struct mktrace_session *s, u64 seq)
{
	struct mktrace_call *c;

	hash_for_each_possible(s->inflight_hash, c, hnode, seq)
		if (c->req.seq == seq)
			return c;
	return NULL;
}

static ssize_t mktrace_dev_read(struct file *f, char __user *buf, size_t len, loff_t *ppos)
{
	struct pid_namespace *ns = task_active_pid_ns(current);
	struct mktrace_session *s = f->private_data;
	struct mktrace_request req;
	struct mktrace_call *c;
	bool requeued = false;
	int err;

	if (READ_ONCE(s->cfg.mode) == MKTRACE_MODE_KTHREAD)
		return mktrace_session_read_records(s, buf, len, f->f_flags & O_NONBLOCK);
	if (len < sizeof(req))
		return -EINVAL;
	for (;;) {
		spin_lock(&s->lock);
		c = list_first_entry_or_null(&s->queue, struct mktrace_call, node);
		if (c)
			break;
		spin_unlock(&s->lock);
		if (f->f_flags & O_NONBLOCK)
			return -EAGAIN;
		err = wait_event_interruptible(s->readq, READ_ONCE(s->nqueued));
		if (err)
			return err;
	}
	list_move_tail(&c->node, &s->inflight);
	hash_add(s->inflight_hash, &c->hnode, c->req.seq);
	s->nqueued--;
	s->ninflight++;
	c->sent = true;
	req = c->req;
	req.pid = task_tgid_nr_ns(c->task, ns);
	req.tid = task_pid_nr_ns(c->task, ns);
	spin_unlock(&s->lock);

	if (copy_to_user(buf, &req, sizeof(req))) {
		/* Put it back at the head for the next reader. */
		spin_lock(&s->lock);
		c = mktrace_find_inflight(s, req.seq);
		if (c) {
			hash_del(&c->hnode);
			list_move(&c->node, &s->queue);
			s->ninflight--;
			s->nqueued++;
			c->sent = false;
			requeued = true;
		}
		spin_unlock(&s->lock);
		/* Readable again: wake other readers and pollers (epoll included). */
		if (requeued)
			wake_up_interruptible_poll(&s->readq, EPOLLIN | EPOLLRDNORM);
		return -EFAULT;
	}
	return sizeof(req);
}

static int mktrace_relay_reply(struct mktrace_session *s, const struct mktrace_reply *r)
{
	struct mktrace_call *c;

	if (r->reserved)
		return -EINVAL;
	if (r->action != MKTRACE_REPLY_CONTINUE && r->action != MKTRACE_REPLY_RETURN)
		return -EINVAL;
	if (r->action == MKTRACE_REPLY_RETURN && r->value <= -MKTRACE_ERESTART_FIRST &&
	    r->value >= -MKTRACE_ERESTART_LAST)
		return -EINVAL;
	spin_lock(&s->lock);
	c = mktrace_find_inflight(s, r->seq);
	if (c)
		mktrace_call_answer(s, c, r->action, r->value, false);
	spin_unlock(&s->lock);
	return c ? 0 : -ENOENT;
}

static ssize_t mktrace_dev_write(struct file *f, const char __user *buf, size_t len,
				 loff_t *ppos)
{
	struct mktrace_session *s = f->private_data;
	struct mktrace_reply r;
	size_t done = 0;
	int err;

	if (!len || len % sizeof(r))
		return -EINVAL;
	while (done < len) {
		err = copy_from_user(&r, buf + done, sizeof(r)) ? -EFAULT : mktrace_relay_reply(s, &r);
		if (err)
			return done ? done : err;
		done += sizeof(r);
	}
	return done;
}

static __poll_t mktrace_dev_poll(struct file *f, poll_table *pt)
{
	struct mktrace_session *s = f->private_data;
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(f, &s->readq, pt);
	if (READ_ONCE(s->nqueued) || mktrace_session_has_records(s))
		mask |= EPOLLIN | EPOLLRDNORM;
	return mask;
}

static long mktrace_ioctl_get(struct mktrace_session *s, unsigned int cmd, void __user *uarg)
{
	struct mktrace_status st;
	struct mktrace_config cfg;

	if (cmd == MKTRACE_IOC_GET_STATUS) {
		mktrace_session_status(s, &st);
		return copy_to_user(uarg, &st, sizeof(st)) ? -EFAULT : 0;
	}
	mktrace_session_get_config(s, &cfg);
	return copy_to_user(uarg, &cfg, sizeof(cfg)) ? -EFAULT : 0;
}

static long mktrace_dev_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct mktrace_session *s = f->private_data;
	void __user *uarg = (void __user *)arg;
	union {
		struct mktrace_config cfg;
		struct mktrace_syscall_set set;
		struct mktrace_stats_query q;
		u64 seq;
	} u;
	long err;

	switch (cmd) {
	case MKTRACE_IOC_GET_STATUS:
	case MKTRACE_IOC_GET_CONFIG:
		return mktrace_ioctl_get(s, cmd, uarg);
	case MKTRACE_IOC_SET_CONFIG:
		if (copy_from_user(&u.cfg, uarg, sizeof(u.cfg)))
			return -EFAULT;
		return mktrace_session_set_config(s, &u.cfg);
	case MKTRACE_IOC_SET_SYSCALLS:
		if (copy_from_user(&u.set, uarg, sizeof(u.set)))
			return -EFAULT;
		return mktrace_session_set_syscalls(s, &u.set);
	case MKTRACE_IOC_REGISTER:
		return arg ? -EINVAL : mktrace_session_register(s);
	case MKTRACE_IOC_GET_STATS:
		if (copy_from_user(&u.q, uarg, sizeof(u.q)))
			return -EFAULT;
		return mktrace_session_get_stats(s, &u.q);
	case MKTRACE_IOC_RESET_STATS:
		if (arg)
			return -EINVAL;
		mktrace_session_reset_stats(s);
		return 0;
	case MKTRACE_IOC_IS_PENDING:
		if (copy_from_user(&u.seq, uarg, sizeof(u.seq)))
			return -EFAULT;
		spin_lock(&s->lock);
		err = mktrace_find_inflight(s, u.seq) ? 0 : -ENOENT;
		spin_unlock(&s->lock);
		return err;
	default:
		return -ENOTTY;
	}
}

static int mktrace_dev_open(struct inode *inode, struct file *f)
{
	struct mktrace_session *s = mktrace_session_new();

	if (!s)
		return -ENOMEM;
	f->private_data = s;
	return nonseekable_open(inode, f);
}

static int mktrace_dev_release(struct inode *inode, struct file *f)
{
	/* fput() from do_exit() runs in the exiting task's task_work */
	mktrace_session_close(f->private_data, current->flags & PF_EXITING);
	return 0;
}

static const struct file_operations mktrace_fops = {
	.owner = THIS_MODULE,
	.open = mktrace_dev_open,
	.release = mktrace_dev_release,
	.read = mktrace_dev_read,
	.write = mktrace_dev_write,
	.poll = mktrace_dev_poll,
	.unlocked_ioctl = mktrace_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice mktrace_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "mktrace",
	.fops = &mktrace_fops,
	.mode = 0600,
};

/**
 * mktrace_dev_init() - create /dev/mktrace
 *
 * Return: 0 or the misc_register() error.
 */
int mktrace_dev_init(void)
{
	return misc_register(&mktrace_misc);
}

/**
 * mktrace_dev_exit() - remove /dev/mktrace
 */
void mktrace_dev_exit(void)
{
	misc_deregister(&mktrace_misc);
}

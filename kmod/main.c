// SPDX-License-Identifier: GPL-2.0
/*
 * main.c - mktrace: forward chosen system calls of a process.
 *
 * A modern take on the mktrace tool of "Modeling Speedup in Multi-OS
 * Environments": ftrace hooks on the __x64_sys_* handlers (hook.c) trap the
 * forwarded calls of a process registered through /dev/mktrace
 * (relay_dev.c, session.c), and either hand them to a delegate kernel
 * thread that spins the forwarding delay (kdelegate.c, the paper's
 * same-node baseline) or to a userspace relay that sends them over the
 * network (relay mode).  See docs/kmod.md.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

#include "mktrace.h"

static int delegate_cpu = -1;
module_param(delegate_cpu, int, 0444);
MODULE_PARM_DESC(delegate_cpu,
		 "CPU the kthread-mode delegate thread is pinned to (-1: last online CPU)");

static unsigned int poll_us = 200;
module_param(poll_us, uint, 0444);
MODULE_PARM_DESC(poll_us,
		 "kthread mode: how long the delegate and a caller poll before sleeping, in us (0: never)");
u64 mktrace_poll_ns;

/* Bounds of default_timeout_ms, the same as those of a session's timeout. */
#define MKTRACE_MIN_TIMEOUT_MS	(MKTRACE_MIN_TIMEOUT_NS / NSEC_PER_MSEC)
#define MKTRACE_MAX_TIMEOUT_MS	(MKTRACE_MAX_TIMEOUT_NS / NSEC_PER_MSEC)

/* Checked at load time and on every write to /sys/module/mktrace/parameters/. */
static int mktrace_set_timeout_ms(const char *val, const struct kernel_param *kp)
{
	unsigned int ms;
	int err = kstrtouint(val, 0, &ms);

	if (err)
		return err;
	if (ms < MKTRACE_MIN_TIMEOUT_MS || ms > MKTRACE_MAX_TIMEOUT_MS)
		return -EINVAL;
	WRITE_ONCE(*(unsigned int *)kp->arg, ms);
	return 0;
}

static const struct kernel_param_ops mktrace_timeout_ops = {
	.set = mktrace_set_timeout_ms,
	.get = param_get_uint,
};

unsigned int mktrace_default_timeout_ms = 5000;
module_param_cb(default_timeout_ms, &mktrace_timeout_ops, &mktrace_default_timeout_ms, 0644);
MODULE_PARM_DESC(default_timeout_ms,
		 "Relay-mode per-call timeout of a new session, in ms (1..3600000, also when written later)");

bool mktrace_kthread_faithful;
module_param_named(kthread_faithful, mktrace_kthread_faithful, bool, 0644);
MODULE_PARM_DESC(kthread_faithful,
		 "Default of new sessions: kthread mode borrows the caller's mm and flushes the TLB on both legs, as the original mktrace (0: off)");

static int __init mktrace_init(void)
{
	int err;

	if (poll_us > 1000000) {
		pr_err("poll_us=%u is above 1000000\n", poll_us);
		return -EINVAL;
	}
	mktrace_poll_ns = (u64)poll_us * NSEC_PER_USEC;
	err = mktrace_hooks_init();
	if (err)
		return err;
	err = mktrace_kdelegate_start(delegate_cpu);
	if (err)
		return err;
	err = mktrace_dev_init();
	if (err) {
		pr_err("cannot register /dev/mktrace: %d\n", err);
		goto undo_kdelegate;
	}
	pr_info("loaded (ABI %d, %d syscalls hookable)\n", MKTRACE_ABI_VERSION, MKTRACE_NR_SYSCALLS);
	return 0;

undo_kdelegate:
	mktrace_kdelegate_stop();
	return err;
}

static void __exit mktrace_exit(void)
{
	mktrace_dev_exit();
	mktrace_kdelegate_stop();
	mktrace_hooks_exit();
	pr_info("unloaded\n");
}

module_init(mktrace_init);
module_exit(mktrace_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("delegation testbed");
MODULE_DESCRIPTION("Forward chosen syscalls of a process to a delegate kthread or a relay");
MODULE_VERSION("2.1.0");

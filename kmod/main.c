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

unsigned int mktrace_default_timeout_ms = 5000;
module_param_named(default_timeout_ms, mktrace_default_timeout_ms, uint, 0644);
MODULE_PARM_DESC(default_timeout_ms,
		 "Relay-mode per-call timeout of a new session, in ms (1..3600000)");

static int __init mktrace_init(void)
{
	int err;

	if (mktrace_default_timeout_ms < 1 || mktrace_default_timeout_ms > 3600000) {
		pr_err("default_timeout_ms=%u is outside 1..3600000\n", mktrace_default_timeout_ms);
		return -EINVAL;
	}
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
MODULE_VERSION("2.0.0");

// SPDX-License-Identifier: GPL-2.0
/*
 * hook.c - ftrace hooks on the x86-64 system call entry points.
 *
 * One ftrace_ops (SAVE_REGS | RECURSION | IPMODIFY) whose filter holds the
 * __x64_sys_* handlers of every syscall some session forwards.  The handler
 * addresses are read from sys_call_table, found with kallsyms_lookup_name,
 * itself found with the kprobe trick (it is not exported since 5.7), so no
 * table of handler names is needed and any syscall number can be hooked.
 *
 * When a hooked handler is entered by a task that a session traces for that
 * syscall, the ftrace callback takes a session and a module reference and
 * rewrites the saved instruction pointer to mktrace_syscall(), passing the
 * session in %rsi and the number in %rdx (the __x64_sys_* handlers take one
 * argument, so those registers are free).  mktrace_syscall() forwards the
 * call (it may sleep: it runs in the caller's normal syscall context), then
 * either calls the original handler or returns the relay's value.  The
 * original handler re-enters the callback with a parent_ip inside this
 * module, which is how the callback knows not to redirect it again.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/ftrace.h>
#include <linux/kallsyms.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/nospec.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/sched/task_stack.h>
#include <linux/string.h>
#include <linux/version.h>

#include "mktrace.h"

typedef long (*mktrace_sys_fn)(const struct pt_regs *regs);

/**
 * struct mktrace_hook - one row per syscall number
 * @addr: the __x64_sys_* handler, 0 until first hooked; never changes after,
 *	so a redirected caller can always find its original handler
 * @users: sessions forwarding this syscall (under mktrace_hook_mutex)
 */
struct mktrace_hook {
	unsigned long addr;
	unsigned int users;
};

static struct mktrace_hook mktrace_hooks[MKTRACE_NR_SYSCALLS];
static unsigned int mktrace_nhooked;
static DEFINE_MUTEX(mktrace_hook_mutex);
static const unsigned long *mktrace_sys_call_table;
static unsigned long mktrace_ni_syscall;

/* Before 5.11 callbacks got a pt_regs, and ftrace guarded recursion by default. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 11, 0)
#define MKTRACE_FTRACE_RECURSION	0
#else
#define MKTRACE_FTRACE_RECURSION	FTRACE_OPS_FL_RECURSION
#endif

static unsigned long mktrace_lookup_name(const char *name)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long (*lookup)(const char *name);
	int err;

	err = register_kprobe(&kp);
	if (err) {
		pr_err("cannot locate kallsyms_lookup_name (kprobe: %d)\n", err);
		return 0;
	}
	lookup = (unsigned long (*)(const char *))kp.addr;
	unregister_kprobe(&kp);
	return lookup(name);
}

/**
 * mktrace_syscall() - replacement entry of a hooked syscall
 * @uregs: the caller's user registers (the argument of __x64_sys_*)
 * @s: session that traces the caller, referenced by the ftrace callback
 * @nr: syscall number, checked by the ftrace callback
 *
 * Entered instead of the original handler; the callback also took a module
 * reference, dropped here once no instruction of this module is left to run
 * but the final return (mktrace_hooks_exit() waits for tasks-RCU on unload).
 *
 * Return: the original handler's result, or the relay's value.
 */
static long notrace mktrace_syscall(const struct pt_regs *uregs,
				    struct mktrace_session *s, unsigned long nr)
{
	mktrace_sys_fn orig = (mktrace_sys_fn)READ_ONCE(mktrace_hooks[nr].addr);
	struct mktrace_verdict v;
	long ret;

	mktrace_forward(s, nr, uregs, &v);
	mktrace_session_put(s);
	if (v.action == MKTRACE_REPLY_RETURN) {
		ret = v.value;
	} else if (nr == __NR_exit || nr == __NR_exit_group) {
		/* Never returns: drop the reference before the call. */
		module_put(THIS_MODULE);
		return orig(uregs);
	} else {
		ret = orig(uregs);
	}
	module_put(THIS_MODULE);
	return ret;
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 11, 0)
static void notrace mktrace_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				      struct ftrace_ops *ops, struct pt_regs *regs)
{
#else
static void notrace mktrace_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				      struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);
#endif
	const struct pt_regs *uregs;
	struct mktrace_session *s;
	unsigned long nr, addr;

	if (!regs || within_module(parent_ip, THIS_MODULE))
		return;
	if (current->flags & (PF_KTHREAD | PF_EXITING))
		return;
	/* Only the syscall path passes the task's own user registers. */
	uregs = (const struct pt_regs *)regs->di;
	if (uregs != task_pt_regs(current))
		return;
	nr = uregs->orig_ax;
	if (nr >= MKTRACE_NR_SYSCALLS)
		return;
	nr = array_index_nospec(nr, MKTRACE_NR_SYSCALLS);
	addr = READ_ONCE(mktrace_hooks[nr].addr);
	/* ip is the fentry site: the entry, or just past an ENDBR. */
	if (!addr || ip < addr || ip - addr > 16)
		return;
	s = mktrace_session_find(current, nr);
	if (!s)
		return;
	if (!try_module_get(THIS_MODULE)) {
		mktrace_session_put(s);
		return;
	}
	regs->si = (unsigned long)s;
	regs->dx = nr;
	instruction_pointer_set(regs, (unsigned long)mktrace_syscall);
}

static struct ftrace_ops mktrace_ops = {
	.func = mktrace_ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | MKTRACE_FTRACE_RECURSION |
		 FTRACE_OPS_FL_IPMODIFY,
};

static int mktrace_hook_resolve(unsigned int nr, unsigned long *addrp)
{
	char name[KSYM_SYMBOL_LEN];
	unsigned long addr = mktrace_sys_call_table[nr];

	if (!addr || addr == mktrace_ni_syscall)
		return -EINVAL;
	/* SYSCALL_DEFINE0 handlers are aliases of their __do_sys_ body. */
	sprint_symbol_no_offset(name, addr);
	if (strncmp(name, "__x64_sys_", 10) && strncmp(name, "__do_sys_", 9)) {
		pr_warn("syscall %u: handler %s is not a syscall entry\n", nr, name);
		return -EINVAL;
	}
	*addrp = addr;
	return 0;
}

static int mktrace_hook_get(unsigned int nr)
{
	struct mktrace_hook *h = &mktrace_hooks[nr];
	unsigned long addr;
	int err;

	if (h->users) {
		h->users++;
		return 0;
	}
	err = mktrace_hook_resolve(nr, &addr);
	if (err)
		return err;
	err = ftrace_set_filter_ip(&mktrace_ops, addr, 0, 0);
	if (err) {
		pr_warn("syscall %u: ftrace_set_filter_ip: %d\n", nr, err);
		return -EINVAL;
	}
	WRITE_ONCE(h->addr, addr);
	if (!mktrace_nhooked) {
		err = register_ftrace_function(&mktrace_ops);
		if (err) {
			pr_err("register_ftrace_function: %d\n", err);
			goto undo_filter;
		}
	}
	mktrace_nhooked++;
	h->users = 1;
	return 0;

undo_filter:
	ftrace_set_filter_ip(&mktrace_ops, addr, 1, 0);
	return err;
}

static void mktrace_hook_put(unsigned int nr)
{
	struct mktrace_hook *h = &mktrace_hooks[nr];
	unsigned long addr = h->addr;

	if (WARN_ON_ONCE(!h->users) || --h->users)
		return;
	/* An ops whose filter goes empty would trace every function. */
	if (!--mktrace_nhooked)
		unregister_ftrace_function(&mktrace_ops);
	ftrace_set_filter_ip(&mktrace_ops, addr, 1, 0);
}

/**
 * mktrace_hooks_update() - move the hooks from one forwarded set to another
 * @old: the set a session forwarded so far
 * @new: the set it forwards from now on
 *
 * Hooks syscalls in @new but not @old, unhooks those only in @old.  On
 * failure nothing changes.
 *
 * Return: 0, or -EINVAL if a number in @new cannot be hooked.
 */
int mktrace_hooks_update(const unsigned long *old, const unsigned long *new)
{
	unsigned int nr, undo;
	int err = 0;

	mutex_lock(&mktrace_hook_mutex);
	for_each_set_bit(nr, new, MKTRACE_MAX_SYSCALLS) {
		if (test_bit(nr, old))
			continue;
		err = nr < MKTRACE_NR_SYSCALLS ? mktrace_hook_get(nr) : -EINVAL;
		if (err)
			goto undo_get;
	}
	for_each_set_bit(nr, old, MKTRACE_NR_SYSCALLS)
		if (!test_bit(nr, new))
			mktrace_hook_put(nr);
	mutex_unlock(&mktrace_hook_mutex);
	return 0;

undo_get:
	for_each_set_bit(undo, new, nr)
		if (!test_bit(undo, old))
			mktrace_hook_put(undo);
	mutex_unlock(&mktrace_hook_mutex);
	return err;
}

/**
 * mktrace_hooks_init() - find the syscall table
 *
 * Return: 0, or -ENOENT if the kernel does not expose what the hooks need.
 */
int mktrace_hooks_init(void)
{
	mktrace_sys_call_table = (const unsigned long *)mktrace_lookup_name("sys_call_table");
	mktrace_ni_syscall = mktrace_lookup_name("__x64_sys_ni_syscall");
	if (!mktrace_sys_call_table) {
		pr_err("sys_call_table not found in kallsyms\n");
		return -ENOENT;
	}
	return 0;
}

/**
 * mktrace_hooks_exit() - wait until no task or callback can still run module code
 *
 * Every session is closed by now, so nothing is hooked; a caller released at
 * close may still be between its module_put() and its return, and the last
 * session may still wait for its RCU callback (mktrace_session_free_rcu()).
 */
void mktrace_hooks_exit(void)
{
	WARN_ON(mktrace_nhooked);
	synchronize_rcu_tasks();
	rcu_barrier();
}

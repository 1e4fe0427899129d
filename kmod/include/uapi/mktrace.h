/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * mktrace.h - userspace ABI of the mktrace module (/dev/mktrace).
 *
 * Shared by the module sources in kmod/ and by userspace; the Python mirror is
 * testbed/interpose/kmod_abi.py and tests/test_kmod.py checks that the two agree
 * (sizes, offsets, ioctl numbers, constants).
 *
 * Usage: open MKTRACE_DEVICE (one open file = one session), set the mode
 * (MKTRACE_IOC_SET_CONFIG) and the forwarded system calls
 * (MKTRACE_IOC_SET_SYSCALLS), then let the process to trace call
 * MKTRACE_IOC_REGISTER on that file (a launcher registers itself and execs
 * the program).  In relay mode each forwarded call becomes one
 * struct mktrace_request readable with read(2) (blocking, or poll(2) for
 * POLLIN); the relay answers with one struct mktrace_reply written with
 * write(2).  Closing the file ends the session and releases every caller.
 *
 * In kthread mode read(2) returns struct mktrace_krecord records instead:
 * one per forwarded call, with the module's own timestamps.
 *
 * MKTRACE_IOC_REGISTER needs no_new_privs (prctl(PR_SET_NO_NEW_PRIVS)) on the
 * calling thread, as an unprivileged seccomp filter does: a traced process
 * never gains privileges through a set-uid/set-gid execve.
 *
 * Changelog of MKTRACE_ABI_VERSION:
 *   1 - first version of the modernised mktrace (ftrace hooks, relay mode).
 *   2 - kthread-mode call records (struct mktrace_krecord, read(2)),
 *       MKTRACE_F_FAITHFUL / MKTRACE_F_FLUSH_CALLER, mktrace_status.dropped,
 *       REGISTER requires no_new_privs and refuses a process another session
 *       traces as a descendant.
 */
#ifndef _UAPI_MKTRACE_H
#define _UAPI_MKTRACE_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define MKTRACE_ABI_VERSION	2
#define MKTRACE_DEVICE		"/dev/mktrace"

/* Syscall numbers 0 .. MKTRACE_MAX_SYSCALLS-1 fit in a set. */
#define MKTRACE_MAX_SYSCALLS	1024
#define MKTRACE_SET_WORDS	(MKTRACE_MAX_SYSCALLS / 64)

/* struct mktrace_config.mode */
#define MKTRACE_MODE_KTHREAD	1	/* spin in the delegate kthread, run locally */
#define MKTRACE_MODE_RELAY	2	/* block until a userspace relay replies */

/* struct mktrace_config.flags */
#define MKTRACE_F_DESCENDANTS	(1U << 0)	/* also trace the target's descendants */
/* kthread mode, as the original mktrace: the delegate thread borrows the
 * caller's mm (kthread_use_mm) for the round trip and flushes its CPU's TLB
 * (__flush_tlb_all) on both legs */
#define MKTRACE_F_FAITHFUL	(1U << 1)
/* with MKTRACE_F_FAITHFUL: the caller also flushes its own CPU's TLB before
 * the hand-off and after it is released */
#define MKTRACE_F_FLUSH_CALLER	(1U << 2)
#define MKTRACE_F_ALL		(MKTRACE_F_DESCENDANTS | MKTRACE_F_FAITHFUL | \
				 MKTRACE_F_FLUSH_CALLER)

/* struct mktrace_krecord.flags */
#define MKTRACE_KREC_RELEASED	(1U << 0)	/* fatal signal before the delegate took it */
#define MKTRACE_KREC_FAITHFUL	(1U << 1)	/* the faithful variant handled it */

/* struct mktrace_config.release_action: a call released without a reply */
#define MKTRACE_ACT_CONTINUE	0	/* run the original handler locally */
#define MKTRACE_ACT_EIO		1	/* fail the call with -EIO */

/* struct mktrace_reply.action */
#define MKTRACE_REPLY_CONTINUE	0	/* run the original handler locally */
#define MKTRACE_REPLY_RETURN	1	/* return value (negative errno for errors) */

/* Limits enforced by MKTRACE_IOC_SET_CONFIG (-EINVAL outside them). */
#define MKTRACE_MAX_DELAY_NS	1000000000ULL		/* 1 s per leg */
#define MKTRACE_MIN_TIMEOUT_NS	1000000ULL		/* 1 ms */
#define MKTRACE_MAX_TIMEOUT_NS	3600000000000ULL	/* 1 h */

/**
 * struct mktrace_config - how forwarded calls of a session are handled
 * @mode: MKTRACE_MODE_KTHREAD or MKTRACE_MODE_RELAY
 * @flags: MKTRACE_F_* bits
 * @delay_ns: kthread mode: the delegate spins this long on the way to the
 *	delegate and again on the way back (the round trip costs 2 * delay_ns)
 * @timeout_ns: relay mode: a caller waits at most this long for a reply
 * @release_action: MKTRACE_ACT_* applied to a caller released without a
 *	reply (timeout, relay closed the device)
 * @reserved: must be zero
 */
struct mktrace_config {
	__u32 mode;
	__u32 flags;
	__u64 delay_ns;
	__u64 timeout_ns;
	__u32 release_action;
	__u32 reserved;
};

/**
 * struct mktrace_syscall_set - the forwarded system calls, a bitmap
 * @bits: bit (nr % 64) of bits[nr / 64] set forwards x86-64 syscall nr
 */
struct mktrace_syscall_set {
	__u64 bits[MKTRACE_SET_WORDS];
};

/**
 * struct mktrace_request - one forwarded call, read(2) from the device
 * @seq: sequence number, unique within the session, echoed in the reply
 * @pid: calling process (thread group id) in the reader's pid namespace
 * @tid: calling thread in the reader's pid namespace
 * @nr: x86-64 system call number
 * @flags: reserved, zero
 * @args: the six system call arguments
 * @ts_ns: CLOCK_MONOTONIC time at which the call was trapped
 */
struct mktrace_request {
	__u64 seq;
	__u32 pid;
	__u32 tid;
	__u32 nr;
	__u32 flags;
	__u64 args[6];
	__u64 ts_ns;
};

/**
 * struct mktrace_krecord - one kthread-mode call, read(2) from the device
 * @tid: calling thread in the pid namespace of the process that opened
 *	the device
 * @nr: x86-64 system call number
 * @flags: MKTRACE_KREC_* bits
 * @cpu: CPU the caller trapped on
 * @ts_trap: the call was trapped
 * @ts_queued: it was queued for the delegate thread
 * @ts_taken: the delegate thread took it (start of the leg to the delegate)
 * @ts_arrive: end of the leg to the delegate (ts_taken + delay)
 * @ts_done: end of the leg back: the delegate completed it
 * @ts_resume: the caller was released and runs the original handler
 *
 * Timestamps are CLOCK_MONOTONIC ns; 0 means "not reached".  The session
 * keeps up to MKTRACE_KREC_RING records for the reader; a record that does
 * not fit is counted in mktrace_status.dropped.
 */
struct mktrace_krecord {
	__u32 tid;
	__u32 nr;
	__u32 flags;
	__u32 cpu;
	__u64 ts_trap;
	__u64 ts_queued;
	__u64 ts_taken;
	__u64 ts_arrive;
	__u64 ts_done;
	__u64 ts_resume;
};

/* Records a session buffers for its reader (kthread mode). */
#define MKTRACE_KREC_RING	65536

/**
 * struct mktrace_reply - the relay's answer, write(2) to the device
 * @seq: sequence number of the request answered
 * @action: MKTRACE_REPLY_CONTINUE or MKTRACE_REPLY_RETURN
 * @reserved: must be zero
 * @value: return value for MKTRACE_REPLY_RETURN (-errno for an error)
 *
 * A reply for a sequence number that is not awaiting one fails with -ENOENT;
 * a malformed reply (wrong size, unknown action, reserved bits) with -EINVAL.
 */
struct mktrace_reply {
	__u64 seq;
	__u32 action;
	__u32 reserved;
	__s64 value;
};

/**
 * struct mktrace_stat - per-syscall statistics of a session
 * @count: forwarded calls
 * @total_ns: sum of the forwarding time of those calls (trap to release)
 * @min_ns: shortest forwarding time (0 before the first call)
 * @max_ns: longest forwarding time
 * @released: calls released without a reply (timeout, relay gone, signal)
 */
struct mktrace_stat {
	__u64 count;
	__u64 total_ns;
	__u64 min_ns;
	__u64 max_ns;
	__u64 released;
};

/**
 * struct mktrace_stats_query - argument of MKTRACE_IOC_GET_STATS
 * @buf: user pointer to an array of @count struct mktrace_stat, indexed by
 *	syscall number (entries past the kernel's table are zeroed)
 * @count: entries in @buf, at most MKTRACE_MAX_SYSCALLS
 * @reserved: must be zero
 */
struct mktrace_stats_query {
	__u64 buf;
	__u32 count;
	__u32 reserved;
};

/**
 * struct mktrace_status - state of a session, MKTRACE_IOC_GET_STATUS
 * @abi_version: MKTRACE_ABI_VERSION of the loaded module
 * @nr_syscalls: size of the kernel's syscall table (valid numbers are below)
 * @target_pid: registered process in the caller's pid namespace, 0 if none
 * @target_alive: 1 while the registered process has a live thread
 * @queued: relay mode: requests not yet read
 * @inflight: relay mode: requests read and awaiting a reply
 * @calls: forwarded calls so far
 * @released: calls released without a reply
 * @delegate_cpu: CPU the kthread-mode delegate thread is pinned to
 * @reserved: zero
 * @dropped: kthread mode: call records lost because the reader lagged
 */
struct mktrace_status {
	__u32 abi_version;
	__u32 nr_syscalls;
	__u32 target_pid;
	__u32 target_alive;
	__u32 queued;
	__u32 inflight;
	__u64 calls;
	__u64 released;
	__u32 delegate_cpu;
	__u32 reserved;
	__u64 dropped;
};

#define MKTRACE_IOC_MAGIC	0xB7

#define MKTRACE_IOC_GET_STATUS	 _IOR(MKTRACE_IOC_MAGIC, 0x00, struct mktrace_status)
#define MKTRACE_IOC_SET_CONFIG	 _IOW(MKTRACE_IOC_MAGIC, 0x01, struct mktrace_config)
#define MKTRACE_IOC_GET_CONFIG	 _IOR(MKTRACE_IOC_MAGIC, 0x02, struct mktrace_config)
#define MKTRACE_IOC_SET_SYSCALLS _IOW(MKTRACE_IOC_MAGIC, 0x03, struct mktrace_syscall_set)
/* Register the calling process as the session's target. */
#define MKTRACE_IOC_REGISTER	 _IO(MKTRACE_IOC_MAGIC, 0x04)
#define MKTRACE_IOC_GET_STATS	 _IOW(MKTRACE_IOC_MAGIC, 0x05, struct mktrace_stats_query)
#define MKTRACE_IOC_RESET_STATS	 _IO(MKTRACE_IOC_MAGIC, 0x06)
/* 0 if request seq (a __u64 passed by pointer) awaits a reply, else -ENOENT. */
#define MKTRACE_IOC_IS_PENDING	 _IOW(MKTRACE_IOC_MAGIC, 0x07, __u64)

#endif /* _UAPI_MKTRACE_H */

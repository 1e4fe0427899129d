#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0-only
# /init of the testbed VM's initramfs (see docs/vm.md and testbed/cluster/vm/).
#
# Runs as PID 1 under Debian's kernel in QEMU:
#   1. loads the modules listed in /modules/order (9p transport, overlayfs, virtio
#      drivers; resolved from the guest kernel's modules.dep by testbed/cluster/vm/initramfs.py),
#   2. mounts the host root (9p tag "hostroot", read-only) and builds a writable
#      root for the guest: overlayfs, tmpfs upper over the 9p lower (fallback:
#      the read-only 9p root with tmpfs on /tmp /var /run),
#   3. mounts the control share (tag "testbed_ctl": config, cmd.sh, and the
#      output/status files) and the optional results share (tag "results"),
#   4. runs /run/testbed-vm/ctl/cmd.sh chrooted in the new root, stdout+stderr to
#      the control share, writes the exit status there and on the console, and
#      powers the machine off.
# Placeholders of the form @NAME@ are filled in by testbed/cluster/vm/initramfs.py.

/bin/busybox mkdir -p /bin /proc /sys /dev /lower /rw /newroot /ctl
/bin/busybox --install -s /bin
export PATH=/bin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

log() { read -r up _ < /proc/uptime; echo "testbed-vm: [$up] $*"; }

finish() {
    # $1: exit status to report.  Tries the control share, always the console.
    echo "$1" > /ctl/status.tmp 2>/dev/null && mv /ctl/status.tmp /ctl/status
    echo "@SENTINEL@=$1"
    sync
    # A reset ends QEMU (-no-reboot) on any machine configuration; power-off
    # (ACPI) and a panic of PID 1 (panic=-1) are the fallbacks.
    reboot -f
    sleep 2
    poweroff -f
    sleep 5
    exit "$1"
}

die() {
    log "FATAL: $*"
    echo "testbed-vm: FATAL: $*" > /ctl/fatal 2>/dev/null
    finish 255
}

log "init: loading modules"
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/modules/$mod" || log "insmod $mod failed"
done < /modules/order

P9OPTS="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$P9OPTS" testbed_ctl /ctl || die "cannot mount the control share"
mount -t 9p -o "$P9OPTS,ro,@HOSTROOT_CACHE@" hostroot /lower || die "cannot mount the host root over 9p"

# Settings written by the host: NET, RESULTS, HOSTNAME, OVERLAY.
NET=0; RESULTS=0; VMHOSTNAME=testbed-vm; OVERLAY=1
[ -f /ctl/config ] && . /ctl/config

mount -t tmpfs -o mode=0755 tmpfs /rw || die "cannot mount tmpfs"
mkdir -p /rw/upper /rw/work
log "init: shares mounted"
ROOTMODE=overlay
if [ "$OVERLAY" != 1 ] || ! mount -t overlay overlay \
        -o "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work" /newroot; then
    # /root stays read-only here: the host's Python may live beneath it (pyenv).
    log "overlayfs over 9p unavailable: read-only root with tmpfs on /tmp /var"
    ROOTMODE=tmpfs-dirs
    mount --bind /lower /newroot || die "cannot bind the host root"
    for d in tmp var; do
        mount -t tmpfs -o mode=0755 tmpfs "/newroot/$d" || die "cannot mount tmpfs on /$d"
    done
    chmod 1777 /newroot/tmp
fi

R=/newroot
mount -t proc proc $R/proc || die "cannot mount /proc"
mount -t sysfs sysfs $R/sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs $R/dev || die "cannot mount /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mkdir -p $R/run/testbed-vm/ctl $R/run/testbed-vm/hostroot $R/run/lock $R/run/sshd
mount --move /ctl $R/run/testbed-vm/ctl || die "cannot move the control share"
mount --bind /lower $R/run/testbed-vm/hostroot
mount -o remount,bind,ro $R/run/testbed-vm/hostroot 2>/dev/null
CTL=$R/run/testbed-vm/ctl
echo "$ROOTMODE" > $CTL/rootmode

if [ "$RESULTS" = 1 ]; then
    mkdir -p $R@RESULTS_DIR@
    mount -t 9p -o "$P9OPTS" results $R@RESULTS_DIR@ || die "cannot mount the results share"
fi

hostname "$VMHOSTNAME"
echo "$VMHOSTNAME" > $R/etc/hostname 2>/dev/null
ip link set lo up
if [ "$NET" = 1 ]; then
    IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
    [ -n "$IF" ] || die "no network interface in the guest"
    ip link set "$IF" up
    ip addr add 10.0.2.15/24 dev "$IF"
    ip route add default via 10.0.2.2
fi

log "init: running the command ($ROOTMODE root)"
# cmd.sh (written by the host) sets PATH, HOME, PYTHONPATH and the working
# directory, then runs the command.
env -i TERM=dumb chroot $R /bin/sh /run/testbed-vm/ctl/cmd.sh < /dev/null > $CTL/output 2>&1
STATUS=$?
sync
finish $STATUS

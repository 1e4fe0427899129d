"""Run commands in a QEMU guest booted with Debian's kernel (the kmod VM harness).

The development machines' own kernel cannot load modules, so the kernel module
is built against Debian's ``linux-headers-amd64`` and loaded in a guest running
Debian's ``linux-image-amd64``.  The guest needs no disk image:

* the host root is shared **read-only** over 9p (tag ``hostroot``) and becomes
  the lower layer of an overlayfs whose upper layer is a tmpfs, so the guest
  runs the host's Python, compilers and the (editable) testbed, and may write
  anywhere (``/tmp``, ``/root``, a module build tree) without touching the host;
  the untouched 9p mount is also visible at ``/run/testbed-vm/hostroot``;
* a per-boot control directory (tag ``testbed_ctl``) carries the command in,
  and the command's output and exit status out;
* an optional read-write *results* share (tag ``results``) is mounted at
  :data:`RESULTS_DIR` so tests can get files back.

The initramfs (busybox-static, ``kmod/vm/init.sh`` and the few modules needed to
mount the shares) is built once per kernel and cached.  QEMU always runs with
``-accel tcg`` (``/dev/kvm`` is not usable on the development machines).

Files, one concern each: ``kernel`` (discovery of the kernel, headers, QEMU,
busybox), ``build`` (module build), ``initramfs`` (cpio and the guest layout),
``image`` (vmlinux extraction), ``boot`` (:func:`run`), ``guest`` (:class:`Guest`,
SSH), ``cli`` (``testbed vm``); for the lab's VM nodes (``testbed lab up --vm-nodes``,
a Debian userland with systemd on a disk image of its own): ``nodeimage`` (the cached
base image, the node initramfs, per-node config disks) and ``node`` (tap, overlay, QEMU).

Public API: :func:`find_kernel`, :func:`ensure_packages`, :func:`build_module`,
:func:`run`, :class:`Guest`, :class:`VMResult`, :class:`VMFailed`,
:class:`VMTimeout`.  See
``docs/vm.md``.
"""

from __future__ import annotations

from testbed.cluster.vm.boot import BASE_KERNEL_ARGS, VMFailed, VMResult, VMTimeout, run
from testbed.cluster.vm.build import build_module
from testbed.cluster.vm.guest import Guest
from testbed.cluster.vm.image import boot_image
from testbed.cluster.vm.initramfs import (
    HOSTROOT_DIR,
    INITRAMFS_FORMAT,
    INITRAMFS_MODULES,
    RESULTS_DIR,
    SENTINEL,
    build_initramfs,
    module_closure,
)
from testbed.cluster.vm.kernel import (
    PACKAGES,
    Kernel,
    ensure_packages,
    find_busybox,
    find_kernel,
    find_qemu,
    missing_packages,
)

__all__ = [
    "BASE_KERNEL_ARGS",
    "HOSTROOT_DIR",
    "INITRAMFS_FORMAT",
    "INITRAMFS_MODULES",
    "PACKAGES",
    "RESULTS_DIR",
    "SENTINEL",
    "Guest",
    "Kernel",
    "VMFailed",
    "VMResult",
    "VMTimeout",
    "boot_image",
    "build_initramfs",
    "build_module",
    "ensure_packages",
    "find_busybox",
    "find_kernel",
    "find_qemu",
    "missing_packages",
    "module_closure",
    "run",
]

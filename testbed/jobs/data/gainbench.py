"""gainbench fallback (no C compiler): the design of gainbench.c in Python.

Same arguments (GAMMA PHASES SAMPLES), the same system-call phase and output
line; the interpreter's start-up calls come on top of the design.  Run with
``python3 -I -S`` (no site import) to keep those few.
"""

import os
import sys

MIX = (("write", 500), ("lseek", 120), ("read", 60), ("fstat", 6), ("getppid", 3), ("uname", 1))


def compute(samples, state):
    x, hits, mask = state, 0, (1 << 64) - 1
    for _ in range(samples):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        a, b = x >> 33, (x >> 2) & 0x7FFFFFFF
        hits += a * a + b * b < (1 << 62)
    return hits, x


def phase(fd_null, fd_zero, buf):
    counts = dict(MIX)
    for i in range(counts["write"]):
        os.write(fd_null, buf[: 512 << (i % 4)])
    for _ in range(counts["lseek"]):
        os.lseek(fd_null, 0, 0)
    for _ in range(counts["read"]):
        os.read(fd_zero, 4096)
    for _ in range(counts["fstat"]):
        os.fstat(fd_zero)
    for _ in range(counts["getppid"]):
        os.getppid()
    for _ in range(counts["uname"]):
        os.uname()


def main(argv):
    if len(argv) != 4 or not all(a.isdigit() for a in argv[1:]):
        return 2
    gamma, phases, samples = (int(a) for a in argv[1:])
    if gamma == 0 or phases == 0:
        return 2
    per, state, hits, total = samples // gamma, 88172645463325252, 0, 0
    fd_null = os.open("/dev/null", os.O_WRONLY)
    fd_zero = os.open("/dev/zero", os.O_RDONLY)
    buf = bytes(4096)
    for _ in range(phases):
        h, state = compute(per, state)
        hits, total = hits + h, total + per
        phase(fd_null, fd_zero, buf)
    os.close(fd_zero)
    os.close(fd_null)
    pi = 4000000 * hits // total if total else 0
    os.write(1, f"gainbench gamma {gamma} samples {total} pi_x1e6 {pi}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

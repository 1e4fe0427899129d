"""Does the kernel's own ftrace hang a TCG guest when it patches a busy syscall entry?

Not a benchmark of the testbed: the reproduction behind docs/vm.md "A TCG hazard:
patching a syscall entry that other threads are running through".  With no
mktrace module loaded, the guest toggles the function tracer on ``__x64_sys_write``
(``set_ftrace_filter`` + ``current_tracer``) while 4 threads call write(2) in a
loop, and the host watches the guest's console for a soft lockup.

    python3 benchmarks/tcg_ftrace_hang.py [--toggles 300] [--timeout 240]

Prints one line: how many toggles finished, whether the console reported a soft
lockup, and the RIP it reported.  Exit status 0 either way (it reports, it does
not judge); 2 if the guest could not be booted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.cluster import vm  # noqa: E402
from testbed.core.errors import TestbedError  # noqa: E402

WRITER_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *loop(void *arg)
{
	(void)arg;
	for (long i = 0; i < 100000000; i++)
		if (write(1, "x\n", 2) != 2)
			_exit(3);
	return NULL;
}
int main(void)
{
	pthread_t tid[4];
	for (int t = 0; t < 4; t++)
		pthread_create(&tid[t], NULL, loop, NULL);
	for (int t = 0; t < 4; t++)
		pthread_join(tid[t], NULL);
	return 0;
}
"""

GUEST_SH = r"""
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
cd /sys/kernel/tracing || { echo "no tracefs"; exit 9; }
echo __x64_sys_write > set_ftrace_filter || exit 9
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
{dir}/writer > /dev/null &
W=$!
i=0
while [ $i -lt {toggles} ] && kill -0 $W 2>/dev/null; do
  echo function > current_tracer; echo nop > current_tracer
  i=$((i+1))
  [ $((i % 10)) -eq 0 ] && echo "toggles $i"
done
kill $W; wait $W
echo "toggles done: $i"
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toggles", type=int, default=300, help="tracer on/off cycles (default 300)")
    ap.add_argument(
        "--timeout", type=float, default=240.0, help="guest time limit, s (default 240)"
    )
    args = ap.parse_args(argv)
    share = Path(tempfile.mkdtemp(prefix="tcg-ftrace-"))
    try:
        src = share / "writer.c"
        src.write_text(WRITER_C)
        subprocess.run(["cc", "-O2", "-pthread", "-o", str(share / "writer"), str(src)], check=True)
        script = GUEST_SH.replace("{dir}", str(vm.RESULTS_DIR)).replace(
            "{toggles}", str(args.toggles)
        )
        try:
            res = vm.run(script, share=share, memory="1G", cwd="/", timeout=args.timeout,
                         kernel_args="loglevel=8")  # fmt: skip
        except (vm.VMTimeout, vm.VMFailed) as exc:  # a soft lockup panics the guest
            res = exc.result
        console, output, timed_out = res.console, res.output, res.timed_out
    except (TestbedError, subprocess.CalledProcessError) as exc:
        print(f"tcg_ftrace_hang: cannot run the guest: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(share, ignore_errors=True)
    done = re.findall(r"toggles (?:done: )?(\d+)", output)
    lockups = re.findall(r"soft lockup - CPU#\d+ stuck for \d+s! \[(\S+)\]", console)
    rips = re.findall(r"RIP: 0010:(\S+)", console)
    modules = re.search(r"modules: (.*)", output)
    print(f"toggles finished: {done[-1] if done else 0} of {args.toggles}; "
          f"guest {'timed out' if timed_out else 'ended' if res.exit_status is not None else 'panicked'}; soft lockups: {len(lockups)} "
          f"({', '.join(sorted(set(lockups))) or '-'}) at {', '.join(sorted(set(rips))) or '-'}; "
          f"modules loaded: {modules.group(1).strip() if modules else '?'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory of this process, for benchmarks that run a stage in a child process."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """High-water RSS of this process's own address space, in MiB. /proc's VmHWM is used where
    there is one: `ru_maxrss` also counts the parent's RSS at fork time (Linux keeps it across
    exec), so a child forked from a large benchmark process would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; macOS reports bytes

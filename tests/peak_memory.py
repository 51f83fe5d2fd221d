"""This process's own memory from ``/proc/self/status``, for the probes that measure what some
work adds at its peak (tests/load_rss.py, tests/loss_probe.py).

Not ``ru_maxrss``: Linux carries the parent's peak into a child through ``exec``, so under a
large pytest process it hides any growth smaller than that parent (read 0 in CI). ``VmHWM`` is
this address space's own high-water mark, and ``reset_peak`` sets it to the RSS now."""


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``: now, ``VmHWM``: peak) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def reset_peak() -> int:
    """Set ``VmHWM`` to the RSS now (``/proc/self/clear_refs``); returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")

"""Peak resident memory of this process, per step (Linux: VmHWM, reset through /proc/self/clear_refs)."""
from __future__ import annotations

from pathlib import Path


def peak_rss() -> int | None:
    """Bytes: the highest RSS since the process started or since the last :func:`reset_peak`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start a new peak measurement; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS only grows between
    the steps of a long conversion). No-op where malloc_trim does not exist."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

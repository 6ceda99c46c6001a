"""Memory and time around a long step, as notebooks print them: the device and what is in use
before, the peak and the run time after. CUDA memory on a GPU; the process's resident memory (RSS)
on the CPU.

Example:
    >>> stats = device_stats()
    >>> "in use" in str(stats)
    True
    >>> "peak" in stats.report()
    True
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..units import human_bytes


class DeviceStats:
    """Started by :func:`device_stats`: ``str()`` shows the device and its memory in use now,
    :meth:`report` the peak since the start (or the last :meth:`restart`) and the time taken."""

    def __init__(self, predicted_peak: int | None = None) -> None:
        self.cuda = torch.cuda.is_available()
        self.predicted_peak = predicted_peak
        self.restart()

    def restart(self) -> None:
        """Start measuring the peak and the time from now."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_rss_peak()
        self.before = self.in_use()
        self.started = time.perf_counter()

    def in_use(self) -> int:
        """Bytes in use now: CUDA memory allocated, or the process's RSS."""
        return memory_in_use()

    def peak(self) -> int:
        """The highest use since the start, in bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")

    def __str__(self) -> str:
        if self.cuda:
            properties = torch.cuda.get_device_properties(torch.cuda.current_device())
            line = f"GPU {properties.name}: {human_bytes(self.before)} in use of {human_bytes(properties.total_memory)}"
        else:
            line = f"CPU ({torch.get_num_threads()} threads): {human_bytes(self.before)} in use (process RSS)"
        if self.predicted_peak is not None:
            line += f"; predicted peak of the next step: +{human_bytes(self.predicted_peak)}"
        return line

    def report(self) -> str:
        """The peak since the start, what it added to the use before, and the time taken.

        Example:
            >>> stats = device_stats()
            >>> _ = torch.ones(1000)
            >>> stats.report().startswith("peak ")
            True
        """
        peak = self.peak()
        return (f"peak {human_bytes(peak)} ({'+' if peak >= self.before else ''}{human_bytes(peak - self.before)} over the start) "
                f"in {time.perf_counter() - self.started:.1f} s")


def memory_in_use() -> int:
    """Bytes in use now: CUDA memory allocated on a GPU, else the process's resident memory.

    Example:
        >>> memory_in_use() > 0
        True
    """
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else _status_bytes("VmRSS")


def device_stats(predicted_peak: int | None = None) -> DeviceStats:
    """Start measuring memory and time; print it for the device and memory in use, call ``.report()`` after the step.

    ``predicted_peak`` (bytes, e.g. ``dq.estimate_memory(model, task="train", ...).peak_bytes``) is shown beside them.

    Example:
        >>> stats = device_stats(predicted_peak=2**30)
        >>> "predicted peak of the next step: +1.00 GiB" in str(stats)
        True
    """
    return DeviceStats(predicted_peak)


def _status_bytes(field: str) -> int:
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(line.split()[1]) * 1024


def _reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    except OSError:
        pass

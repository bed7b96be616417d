"""Measurement helpers shared by the benchmarks: wall time (best of R), peak memory, machine description, atomic writes.

Peak memory on CPU: torch's CPU allocator keeps no statistics and ``tracemalloc`` sees only Python objects, so the
benchmarks read the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``). On Linux it is reset
before each measured call by writing ``5`` to ``/proc/self/clear_refs``, so the peak belongs to that call alone; the
reported figure is ``peak RSS during the call - RSS just before it`` (what the call added on top of the loaded
model and inputs). Where the reset is not possible (not Linux, restricted ``/proc``) a background thread samples
RSS every 5 ms with ``psutil`` instead (``method`` records which one was used). Before each call the garbage
collector runs and glibc returns freed heap to the OS; memory the call reuses from caches that are not returned
(torch's, Python's) is still invisible to this method, so a figure near 0 means "no new memory", not "none used".
"""

from __future__ import annotations

import csv
import ctypes
import gc
import io
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from clap.contract import atomic_write_text

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier calls back to the OS (glibc ``malloc_trim``), so that RSS before a call is not
    inflated by free heap that the call would reuse, which would hide its peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class _Sampler(threading.Thread):
    """Fallback peak-RSS meter: samples every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss_mb()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mb())
            time.sleep(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self.join()
        return max(self.peak, current_rss_mb())


@dataclass
class Measurement:
    """Best-of-R wall time and the largest peak-RSS increase seen over the R calls."""

    times: list[float] = field(default_factory=list)
    #: the process's CPU time (every thread, user + system) of each call: on a shared machine, less disturbed by
    #: other processes than wall time (it does not count time spent waiting for a core)
    cpu_times: list[float] = field(default_factory=list)
    peak_rss_delta_mb: float = 0.0
    peak_rss_mb: float = 0.0
    memory_method: str = ""
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_times)


def measure(fn: Callable[[], Any], repeats: int) -> Measurement:
    """Call ``fn`` ``repeats`` times; keep the last result, every wall and CPU time and the peak memory."""
    out = Measurement()
    for _ in range(repeats):
        gc.collect()
        _release_freed_memory()
        exact = _reset_hwm()
        before = current_rss_mb()
        sampler = None
        if not exact:
            sampler = _Sampler()
            sampler.start()
        start, cpu = time.perf_counter(), time.process_time()
        out.result = fn()
        out.times.append(time.perf_counter() - start)
        out.cpu_times.append(time.process_time() - cpu)
        peak = _status_kb("VmHWM") / 1024 if exact else sampler.stop()
        out.memory_method = "VmHWM reset via clear_refs" if exact else "psutil RSS sampled every 5 ms"
        out.peak_rss_mb = max(out.peak_rss_mb, peak)
        out.peak_rss_delta_mb = max(out.peak_rss_delta_mb, peak - before)
    return out


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, threads, library versions, load, date."""
    import torch

    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "nnsight": _version("nnsight"),
        "transformer-lens": _version("transformer-lens"),
        "load_average": load_average(),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path`` and rename: a reader never sees a half-written file."""
    atomic_write_text(path, text)


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buffer.getvalue()

"""Timing and peak-memory helpers of the benchmarks.

CPU: time.perf_counter around each call, after a warm-up; the median of the samples.
GPU: a CUDA event pair around each call, after a warm-up, then one synchronize; the median.
     The callers rotate over input sets larger than the L2 cache (see `rotation_count`), so that
     a memory-bound kernel is not timed on inputs the previous call left in cache.

Peak memory (bytes above what was allocated before the call):
GPU: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats (the caching
     allocator's view: tensors, not the allocator's reserve).
CPU: the process's peak resident set size, VmHWM of /proc/self/status, after resetting it by
     writing "5" to /proc/self/clear_refs (Linux >= 4.0) and returning freed heap pages to the
     OS with glibc's malloc_trim(0), minus the resident size before the call. Where clear_refs
     cannot be written, getrusage's ru_maxrss (never reset) gives the rise of the process-wide
     peak only, and the method is reported as such. `CPU_PEAK_METHOD` says which one is in use.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    """Seconds per call: median and spread of `n` samples."""

    median: float
    min: float
    mean: float
    iqr: float
    n: int

    @property
    def ms(self) -> float:
        return self.median * 1e3

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float]) -> Timing:
    if not samples:
        raise ValueError("summarize: no samples")
    s = sorted(samples)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = s[-1] - s[0]
    return Timing(median=statistics.median(s), min=s[0], mean=statistics.fmean(s), iqr=iqr, n=len(s))


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample(fn: Callable[[], object], device: torch.device | str, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of `fn()`. CUDA: a CUDA event pair around each call and one
    synchronize at the end (the events measure GPU time; no host sync between calls). CPU:
    perf_counter around each call."""
    dev = torch.device(device)
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    target_s: float = 0.5,
) -> Timing:
    """Time `fn()` on `device`: `warmup` untimed calls, then between `min_reps` and `max_reps`
    timed calls, as many as fit in about `target_s` seconds (sized from the first timed call)."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"time_fn: need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    first = sample(fn, dev, 1)
    reps = reps_for(first[0], target_s, min_reps, max_reps) - 1
    return summarize(first + (sample(fn, dev, reps) if reps > 0 else []))


def reps_for(one_call_s: float, target_s: float, min_reps: int, max_reps: int) -> int:
    """How many calls of `one_call_s` seconds fit in `target_s`, clamped to [min_reps, max_reps]."""
    return int(min(max_reps, max(min_reps, math.ceil(target_s / max(one_call_s, 1e-7)))))


def rotation_count(bytes_per_set: int, device: torch.device | str, max_sets: int = 16) -> int:
    """How many copies of a case's inputs to rotate over so that together they exceed twice the
    L2 cache (GPU only; 1 on the CPU, where the caches are small next to these tensors and the
    memory is shared with everything else)."""
    dev = torch.device(device)
    if dev.type != "cuda" or bytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    return int(min(max_sets, max(1, math.ceil(2 * l2 / bytes_per_set))))


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _clear_refs_writable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CPU_PEAK_METHOD = (
    "VmHWM (/proc/self/status) reset via /proc/self/clear_refs, after malloc_trim(0); minus VmRSS before"
    if _clear_refs_writable()
    else "getrusage ru_maxrss rise (process-wide peak, not resettable here)"
)
_RESETTABLE = CPU_PEAK_METHOD.startswith("VmHWM")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory in bytes that one call of `fn()` needs above what was in use before it
    (its outputs included, since they are alive at the peak). None where it cannot be measured."""
    dev = torch.device(device)
    if dev.type == "cuda":
        gc.collect()  # tensors held only by reference cycles would count as in use
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del out
        return int(max(peak, 0))
    if dev.type != "cpu":
        return None
    _malloc_trim()
    if _RESETTABLE:
        _clear_refs_writable()
        before = _status_kb("VmRSS")
        out = fn()
        peak = _status_kb("VmHWM")
        del out
        if before is None or peak is None:
            return None
        return max(peak - before, 0) * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return max(after - before, 0) * 1024


def environ_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")

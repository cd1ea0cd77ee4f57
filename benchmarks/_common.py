"""What the benchmark scripts share: timing, peak memory, a measurement in a fresh process, the final line.

The scripts in benchmarks/ import it as ``_common`` (a script's own folder is on sys.path when it runs);
those in benchmarks/studies/ put benchmarks/ on sys.path first.

- timing: :func:`sync`, :func:`timed` (one call), :func:`median_time` (a warm-up call, then the median of
  repeated calls);
- peak memory: :data:`MB`, :func:`rss_kib`, :func:`memory_in_use`, :func:`measure_step` (one call with the
  high-water mark reset before it: its seconds and the peak), :func:`tensor_mb`;
- a fresh process: :func:`run_child` starts this script again with its child arguments and reads the
  JSON that the child prints with :func:`reply`;
- the output: :func:`print_result`, the line of JSON every benchmark prints last;
- the examples: :data:`EXAMPLES`, :func:`load_example`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

MB = 2**20
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# A fixed mmap threshold makes glibc return every freed block of >= 128 KiB to the system at once, so
# the RSS follows the live tensors; with glibc's default (a threshold that grows up to 32 MiB) freed
# temporaries stay in the heap and the peak varies from run to run.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], Any], device: str = "cpu") -> float:
    """Seconds of one call of ``call``, the device synchronized before and after it."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def median_time(step: Callable[[], Any], repeats: int, device: str = "cpu", min_seconds: float = 0.0) -> float:
    """Median seconds of at least ``repeats`` timed calls of ``step`` after one warm-up call (vmap/jvp
    tracing, the allocator, buffers); more calls for fast steps, until ``min_seconds`` are spent."""
    step()  # warm-up
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        times.append(timed(step, device))
    return statistics.median(times)


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: ``VmRSS`` (the resident set now) or ``VmHWM`` (its
    high-water mark, which ``measure_step`` resets)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_in_use(device: str = "cpu") -> int:
    """Bytes in use now: the resident set size on the CPU, torch.cuda.memory_allocated on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return rss_kib("VmRSS") * 1024


def measure_step(step: Callable[[], Any], device: str = "cpu") -> tuple[Any, float, int]:
    """Run ``step`` once with the memory high-water mark reset before it; returns what it returned, its
    seconds and the peak bytes in use during it (take the baseline with :func:`memory_in_use` first).

    On the CPU the peak is the kernel's high-water mark of the RSS (VmHWM, what getrusage's ru_maxrss
    reports), reset to the current RSS through /proc/self/clear_refs: ru_maxrss itself is useless in a
    child process, since Linux carries the parent's peak over exec. On CUDA: max_memory_allocated after
    reset_peak_memory_stats."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the high-water mark starts again from the current RSS
    start = time.perf_counter()
    value = step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024
    return value, seconds, peak


def tensor_mb(tensors: Iterable[torch.Tensor]) -> float:
    """MB the tensors take (e.g. a model's parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def run_child(script: str, arguments: Sequence[str], fixed_mmap_threshold: bool = True) -> Any:
    """Run ``python script *arguments`` in a fresh process and return the JSON of the last line it
    prints (:func:`reply`). With ``fixed_mmap_threshold`` the child runs with glibc's mmap threshold
    fixed at 128 KiB (:data:`FIXED_MMAP_THRESHOLD`), so that its RSS follows the live tensors."""
    env = {**os.environ, **FIXED_MMAP_THRESHOLD} if fixed_mmap_threshold else os.environ
    output = subprocess.run([sys.executable, script, *arguments], check=True, capture_output=True, text=True,
                            env=env).stdout
    return json.loads(output.splitlines()[-1])


def reply(value: Any) -> None:
    """In a child started by :func:`run_child`: its answer, one line of JSON on stdout."""
    print(json.dumps(value))


def print_result(benchmark: str, **fields: Any) -> None:
    """The last line every benchmark prints: one line of JSON, ``{"benchmark": name, **fields}``."""
    print(json.dumps({"benchmark": benchmark, **fields}))


def load_example(name: str) -> ModuleType:
    """The module of examples/<name>.py (its definitions run; its main does not)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

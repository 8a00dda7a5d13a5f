"""What the GPU did during each step, for the step records (a GPU rank only; on CPUs nothing
is added, docs/gpu.md):

- `gpu_mem_peak_mb`: the most device memory TensorFlow's allocator held during the call of
  steps (`tf.config.experimental.get_memory_info`, its peak reset after each call), the same
  for every step of one call;
- `gpu_util`: NVML's utilization (percent of time a kernel ran, over its own sample period),
  sampled about once a second by a thread off the step's path; a step gets the mean of the
  samples taken while it ran, else the last one before its end. NVML comes from
  `nvidia-ml-py`; without it, or for a MIG instance (NVML gives no utilization for one),
  records carry no gpu_util.

The sampler and the rule that matches samples to steps are plain Python with the reader
passed in, so they are tested without a GPU (tests/runtime/test_devstats.py).
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import deque

from pipeline.runtime.hooks import Hook

SAMPLE_S = 1.0
_PCI = re.compile(r"pci bus id:\s*([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])")


def util_for_steps(samples: list[tuple[float, float]], steps: list[tuple[float, float]],
                   stale_s: float = 3 * SAMPLE_S) -> list[float | None]:
    """For each step (start, end) in unix seconds: the mean of the samples (time, value) taken
    in (start, end], else the last sample at or before `end` if it is at most `stale_s` old,
    else None. `samples` in time order."""
    times = [t for t, _ in samples]
    out = []
    for start, end in steps:
        a, b = bisect.bisect_right(times, start), bisect.bisect_right(times, end)
        if b > a:
            out.append(sum(v for _, v in samples[a:b]) / (b - a))
        elif b and end - times[b - 1] <= stale_s:
            out.append(samples[b - 1][1])
        else:
            out.append(None)
    return out


def pci_bus_id(physical_device_desc: str) -> str | None:
    """The PCI bus id in TensorFlow's description of a GPU ("device: 0, name: NVIDIA H100 80GB
    HBM3, pci bus id: 0000:19:00.0, compute capability: 9.0")."""
    m = _PCI.search(physical_device_desc or "")
    return m.group(1) if m else None


class Sampler:
    """A daemon thread calling `read()` every `every_s` seconds; `take(steps)` matches the
    samples to the steps (util_for_steps) and drops those older than the first step."""

    def __init__(self, read, every_s: float = SAMPLE_S, clock=time.time, keep: int = 600):
        self._read, self._every, self._clock = read, every_s, clock
        self._samples: deque = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = float(self._read())
            except Exception:  # noqa: BLE001 - a failed read costs one sample, never the run
                self.errors += 1
            else:
                with self._lock:
                    self._samples.append((self._clock(), value))
            self._stop.wait(self._every)

    def take(self, steps: list[tuple[float, float]]) -> list[float | None]:
        with self._lock:
            samples = list(self._samples)
            if steps:
                while len(self._samples) > 1 and self._samples[1][0] <= steps[0][0]:
                    self._samples.popleft()
        return util_for_steps(samples, steps)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._every + 1)


def nvml_reader(entry: str | None, bus_id: str | None):
    """(read, None) where NVML can sample this rank's GPU (read() -> utilization percent), else
    (None, why not). `entry`: the rank's CUDA_VISIBLE_DEVICES entry (pipeline/runtime/gpus.py);
    `bus_id`: its PCI bus id. NVML numbers GPUs its own way (PCI order, all of the node's), so
    an index means nothing to it: a UUID or the bus id finds the device."""
    if entry and entry.startswith("MIG-"):
        return None, "NVML gives no utilization for a MIG instance"
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (make env GPU=cuda installs it)"
    try:
        pynvml.nvmlInit()
        if entry and entry.startswith("GPU-"):
            handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
        elif bus_id:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        else:
            return None, "this rank's GPU has neither a UUID nor a PCI bus id to find it by in NVML"
        pynvml.nvmlDeviceGetUtilizationRates(handle)
    except Exception as e:  # noqa: BLE001 - NVMLError and its many subclasses
        return None, f"NVML: {e}"
    return (lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), None


class DeviceHook(Hook):
    """Adds gpu_mem_peak_mb and gpu_util to each call's step records (a GPU rank only)."""

    def __init__(self, memory_info, reset, sampler: Sampler | None):
        self._memory_info, self._reset, self.sampler = memory_info, reset, sampler

    def on_call(self, first: int, last: int) -> None:
        self._reset()  # the peak from here covers this call only

    def on_steps(self, records: list[dict]) -> None:
        peak = round(self._memory_info()["peak"] / 2**20, 1)
        utils = self.sampler.take([(r["time"] - r["step_s"], r["time"]) for r in records]) if self.sampler \
            else [None] * len(records)
        for r, u in zip(records, utils):
            r["gpu_mem_peak_mb"] = peak
            if u is not None:
                r["gpu_util"] = round(u, 1)

    def on_end(self, state) -> None:
        if self.sampler is not None:
            self.sampler.close()


def for_rank(entry: str | None, say) -> DeviceHook | None:
    """The hook for a rank that trains on a GPU (`entry`: the CUDA_VISIBLE_DEVICES entry
    dist.pin_gpu chose, where TensorFlow has it), or None for a CPU rank (entry None: its
    records stay as they are). `say` gets one line when utilization cannot be sampled."""
    if entry is None:
        return None
    import tensorflow as tf
    from tensorflow.python.client import device_lib

    desc = next((d.physical_device_desc for d in device_lib.list_local_devices() if d.device_type == "GPU"), "")
    read, why = nvml_reader(entry, pci_bus_id(desc))
    if read is None:
        say(f"pipeline: no gpu_util in the step records: {why}")
    return DeviceHook(lambda: tf.config.experimental.get_memory_info("GPU:0"),
                      lambda: tf.config.experimental.reset_memory_stats("GPU:0"),
                      Sampler(read) if read else None)

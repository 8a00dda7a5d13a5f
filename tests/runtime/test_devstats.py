"""GPU figures of the step records (pipeline/runtime/devstats.py). There is no GPU here: the
memory counters and NVML are replaced by stand-ins handed to the hook and the sampler (their
TensorFlow and NVML calls are the only parts not run); on this CPU machine the real
`for_rank` is asked and must add nothing."""

import threading

from pipeline.runtime import devstats


def test_each_step_gets_the_mean_of_the_samples_taken_while_it_ran():
    samples = [(10.0, 20.0), (11.0, 40.0), (12.0, 60.0), (13.0, 80.0)]
    steps = [(9.5, 11.5), (11.5, 11.9), (12.5, 13.5), (20.0, 21.0), (0.0, 5.0)]
    # (9.5, 11.5]: 20 and 40; (11.5, 11.9]: none, the last before its end (40); (12.5, 13.5]: 80;
    # long after the last sample: stale, None; before any sample: None.
    assert devstats.util_for_steps(samples, steps) == [30.0, 40.0, 80.0, None, None]


def test_pci_bus_id_from_tensorflows_device_description():
    desc = "device: 0, name: NVIDIA H100 80GB HBM3, pci bus id: 0000:19:00.0, compute capability: 9.0"
    assert devstats.pci_bus_id(desc) == "0000:19:00.0"
    assert devstats.pci_bus_id("device: 0, name: x") is None


def test_no_utilization_for_a_mig_instance():
    read, why = devstats.nvml_reader("MIG-5d0a0b33-a0b6-5e4f-ad6c-8a2b3c4d5e6f", None)
    assert read is None and "MIG" in why


def test_the_sampler_reads_off_the_callers_thread_and_matches_steps():
    values = iter([10.0, 30.0, 50.0] + [50.0] * 10_000)
    three = threading.Event()
    seen, clock = [], iter(range(1, 10_000))

    def read():
        seen.append(threading.current_thread().name)
        if len(seen) >= 3:
            three.set()
        return next(values)

    s = devstats.Sampler(read, every_s=0.001, clock=lambda: float(next(clock)))
    try:
        assert three.wait(30), "the sampler never read three samples"
    finally:
        s.close()
    assert seen[0] == "gpu-util" and threading.current_thread().name != "gpu-util"
    assert s.take([(0.5, 2.5)]) == [20.0]  # samples at t=1 and t=2
    assert s.take([(2.5, 3.0)]) == [50.0]  # older samples dropped, t=3 kept


class FakeSampler:
    def take(self, steps):
        return [55.0] * (len(steps) - 1) + [None]

    def close(self):
        self.closed = True


def test_the_hook_adds_the_calls_memory_peak_and_each_steps_utilization():
    resets = []
    hook = devstats.DeviceHook(lambda: {"current": 1 << 20, "peak": 3 * 2**20 + 2**19}, lambda: resets.append(1),
                               FakeSampler())
    hook.on_call(1, 2)
    records = [{"step": 1, "time": 10.0, "step_s": 0.5}, {"step": 2, "time": 10.5, "step_s": 0.5}]
    hook.on_steps(records)
    assert resets == [1]
    assert [r["gpu_mem_peak_mb"] for r in records] == [3.5, 3.5]
    assert records[0]["gpu_util"] == 55.0 and "gpu_util" not in records[1]  # no sample: no field
    hook.on_end(None)
    assert hook.sampler.closed


def test_on_this_cpu_machine_no_device_hook_and_no_gpu_fields():
    assert devstats.for_rank(None, print) is None

"""The device peak behind MFU (pipeline/runtime/peak.py), on hand-made inputs: GPU names as
nvidia-smi and TensorFlow print them, /proc/cpuinfo of the CPUs clusters run, and a cpufreq
file present or not. Nothing here reads this machine."""

import pytest

from pipeline.runtime.peak import cpu_peak, gpu_peak, mfu


@pytest.mark.parametrize("name, precision, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "float32", True, 494.5),        # SXM: TF32 tensor cores
    ("NVIDIA H100 80GB HBM3", "mixed_bfloat16", True, 989.5),
    ("NVIDIA H100 80GB HBM3", "float32", False, 67.0),        # TF32 turned off: plain FP32
    ("NVIDIA H100 PCIe", "mixed_float16", True, 756.5),
    ("NVIDIA H100 NVL", "float32", True, 417.5),
    ("NVIDIA H200", "mixed_float16", True, 989.5),
    ("NVIDIA H200 NVL", "mixed_float16", True, 835.5),
    ("NVIDIA GH200 480GB", "float32", True, 494.5),           # not taken for an H200
    ("NVIDIA A100-SXM4-80GB", "float32", True, 156.0),
    ("NVIDIA A100 80GB PCIe", "mixed_float16", True, 312.0),
    ("Tesla V100-SXM2-32GB", "float32", True, 15.7),           # no TF32 before Ampere
    ("Tesla V100-PCIE-16GB", "mixed_float16", True, 112.0),
])
def test_gpu_peaks_by_name_and_precision(name, precision, tf32, tflops):
    p = gpu_peak(name, precision, tf32)
    assert p.flops_per_s == pytest.approx(tflops * 1e12) and p.device == name
    assert "data sheet" in p.source


def test_a_gpu_not_in_the_table_has_no_peak():
    assert gpu_peak("NVIDIA GeForce GT 710") is None


def cpuinfo(vendor, family, flags, mhz="2596.000", model="AMD EPYC"):
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: {model}\n"
            f"cpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: sse\n")


ZEN4 = cpuinfo("AuthenticAMD", 25, "fpu sse avx avx2 fma avx512f avx512_bf16")
ZEN5 = cpuinfo("AuthenticAMD", 26, "fpu sse avx avx2 fma avx512f avx512_bf16 avx512_vp2intersect")
SPR = cpuinfo("GenuineIntel", 6, "fpu sse avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", model="Xeon 8480+")
HSW = cpuinfo("GenuineIntel", 6, "fpu sse avx avx2 fma", model="Xeon E5-2680 v3")


@pytest.mark.parametrize("info, precision, per_cycle", [
    (ZEN4, "float32", 32),          # AVX-512 on 256-bit units: AVX2's rate
    (ZEN5, "float32", 64),
    (SPR, "float32", 64),
    (HSW, "float32", 32),
    (cpuinfo("GenuineIntel", 6, "fpu sse avx"), "float32", 16),
    (SPR, "mixed_bfloat16", 1024),  # AMX tiles
    (ZEN4, "mixed_bfloat16", 64),   # AVX-512 BF16: twice float32
    (HSW, "mixed_bfloat16", 32),    # no bfloat16 instructions: emulated at float32's rate
])
def test_cpu_flops_per_cycle_from_the_flags(info, precision, per_cycle):
    p = cpu_peak(1, info, None, precision)
    assert p.flops_per_s == pytest.approx(2596e6 * per_cycle)


def test_cpu_peak_prefers_the_maximum_frequency_and_counts_threads():
    p = cpu_peak(4, ZEN5, "3700000", "float32")  # cpuinfo_max_freq in kHz
    assert p.flops_per_s == pytest.approx(4 * 3.7e9 * 64) and "cpuinfo_max_freq" in p.source
    p = cpu_peak(4, ZEN5, None)
    assert p.flops_per_s == pytest.approx(4 * 2.596e9 * 64) and "cpu MHz" in p.source
    assert cpu_peak(2, "processor\t: 0\nflags\t: avx2 fma\n", None) is None  # no frequency at all


def test_mfu_needs_every_part():
    assert mfu(1e6, 1000, 1e10) == pytest.approx(0.1)
    assert mfu(None, 1000, 1e10) is None and mfu(1e6, None, 1e10) is None and mfu(1e6, 1000, None) is None

"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilization: the model's FLOPs
per second achieved over what the hardware could do at most). Small pure functions of what a
process sees (a GPU's name, /proc/cpuinfo, a frequency), tested with hand-made inputs
(tests/runtime/test_peak.py); the standard library only, so `make gpu-check` runs them on a
node without TensorFlow.

GPUs: a table by name and precision, dense figures (no structured sparsity) from NVIDIA's data
sheets. float32 on Ampere and later is counted against the TF32 tensor-core peak: TensorFlow
runs float32 matmuls and convolutions as TF32 there unless
`tf.config.experimental.enable_tensor_float_32_execution(False)`.

CPUs: threads x maximum frequency x FLOPs per cycle per core of the widest vector unit the
flags show (an FMA is two FLOPs). Hyperthreads of one core share its vector units, so a rank
given both threads of a core is held to twice what that core can do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: str          # how the figure was found, said next to the MFU
    device: str          # what it is the peak of


# name (as nvidia-smi and TensorFlow give it, matched in this order) ->
# (FP32, TF32 tensor, FP16/BF16 tensor) TFLOP/s dense; TF32 None: no TF32 (before Ampere).
GPU_PEAKS = (
    ("GH200", (67.0, 494.5, 989.5), "NVIDIA GH200 data sheet (H100 SXM figures), dense"),
    ("H200 NVL", (60.0, 417.5, 835.5), "NVIDIA H200 NVL data sheet, dense (half the sparsity figures)"),
    ("H200", (67.0, 494.5, 989.5), "NVIDIA H200 SXM data sheet, dense (half the sparsity figures)"),
    ("H100 NVL", (60.0, 417.5, 835.5), "NVIDIA H100 NVL data sheet, dense (half the sparsity figures)"),
    ("H100 PCIe", (51.0, 378.0, 756.5), "NVIDIA H100 PCIe data sheet, dense (half the sparsity figures)"),
    ("H100", (67.0, 494.5, 989.5), "NVIDIA H100 SXM data sheet, dense (half the sparsity figures)"),
    ("A100", (19.5, 156.0, 312.0), "NVIDIA A100 data sheet (SXM4 and PCIe alike), dense"),
    ("L40S", (91.6, 183.0, 362.0), "NVIDIA L40S data sheet, dense"),
    ("L4", (30.3, 60.0, 121.0), "NVIDIA L4 data sheet, dense"),
    ("A10", (31.2, 62.5, 125.0), "NVIDIA A10 data sheet, dense"),
    ("V100S", (16.4, None, 130.0), "NVIDIA V100S data sheet"),
    ("V100-PCIE", (14.0, None, 112.0), "NVIDIA V100 PCIe data sheet"),
    ("V100", (15.7, None, 125.0), "NVIDIA V100 SXM2 data sheet"),
)

HALF = ("mixed_float16", "mixed_bfloat16")


def gpu_peak(name: str, precision: str = "float32", tf32: bool = True) -> Peak | None:
    """One GPU's peak for `precision` (train.precision), or None for a GPU not in the table."""
    for key, (fp32, tf32_peak, half), sheet in GPU_PEAKS:
        if key.lower() in name.lower():
            if precision in HALF:
                value, row = half, "FP16/BF16 tensor cores"
            elif tf32 and tf32_peak is not None:
                value, row = tf32_peak, "TF32 tensor cores (TensorFlow's float32 default on this GPU)"
            else:
                value, row = fp32, "FP32"
            return Peak(value * 1e12, f"{key} {row}: {value:g} TFLOP/s ({sheet})", name)
    return None


def cpu_fields(cpuinfo: str) -> dict:
    """The first processor's fields of /proc/cpuinfo (flags as a set)."""
    out: dict = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    out["flags"] = set(out.get("flags", "").split())
    return out


def cpu_flops_per_cycle(fields: dict, precision: str = "float32") -> tuple[int, str]:
    """FLOPs per cycle per core and why: the widest vector FMA the flags show, two pipes.
    bfloat16 (train.precision mixed_bfloat16): AMX tiles, else AVX-512 BF16 dot products (twice
    the float32 rate), else float32's rate (TensorFlow emulates it)."""
    flags, vendor = fields.get("flags", set()), fields.get("vendor_id", "")
    try:
        family = int(fields.get("cpu family", "0"))
    except ValueError:
        family = 0
    amd = vendor == "AuthenticAMD"
    if "avx512f" in flags and amd and family < 26:
        fp32, why = 32, f"AVX-512 on AMD family {family} (Zen 4: 256-bit units, as AVX2 with two FMA pipes)"
    elif "avx512f" in flags and amd:
        fp32, why = 64, f"AVX-512 on AMD family {family} (Zen 5: 512-bit units, two FMA pipes)"
    elif "avx512f" in flags:
        fp32, why = 64, "AVX-512 with two FMA pipes (one on some Xeon Silver and Bronze parts: half)"
    elif "avx2" in flags and "fma" in flags:
        fp32, why = 32, "AVX2 with two FMA pipes"
    elif "avx" in flags:
        fp32, why = 16, "AVX (no FMA)"
    else:
        fp32, why = 8, "SSE"
    if precision == "mixed_bfloat16":
        if "amx_bf16" in flags:
            return 1024, "AMX BF16 tiles"
        if "avx512_bf16" in flags:
            return 2 * fp32, f"AVX-512 BF16 dot products (twice {why})"
        return fp32, f"{why}; no bfloat16 instructions: emulated"
    return fp32, why


def cpu_max_mhz(max_freq_khz: str | None, fields: dict) -> tuple[float | None, str]:
    """The maximum frequency: cpufreq's cpuinfo_max_freq (kHz), else /proc/cpuinfo's `cpu MHz`
    (the current clock: under turbo the peak is then understated)."""
    try:
        if max_freq_khz and int(max_freq_khz) > 0:
            return int(max_freq_khz) / 1000, "cpuinfo_max_freq"
    except ValueError:
        pass
    try:
        return float(fields["cpu MHz"]), "cpu MHz (no cpuinfo_max_freq)"
    except (KeyError, ValueError):
        return None, "no frequency known"


def cpu_peak(threads: int, cpuinfo: str, max_freq_khz: str | None, precision: str = "float32") -> Peak | None:
    """The peak of `threads` CPU threads; None when /proc/cpuinfo gives no frequency."""
    fields = cpu_fields(cpuinfo)
    mhz, freq_from = cpu_max_mhz(max_freq_khz, fields)
    if mhz is None or threads < 1:
        return None
    per_cycle, why = cpu_flops_per_cycle(fields, precision)
    kind = "bf16" if precision == "mixed_bfloat16" else "fp32"
    return Peak(threads * mhz * 1e6 * per_cycle,
                f"{threads} thread(s) x {mhz:.0f} MHz ({freq_from}) x {per_cycle} {kind} FLOP/cycle ({why})",
                fields.get("model name", "CPU"))


def this_cpu(threads: int, precision: str = "float32") -> Peak | None:
    """cpu_peak of this machine (reads /proc/cpuinfo and cpufreq)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            khz = f.read().strip()
    except OSError:
        khz = None
    return cpu_peak(threads, info, khz, precision)


def mfu(flops_per_sample: float | None, samples_per_s: float | None, peak_flops_per_s: float | None) -> float | None:
    """Achieved model FLOP/s over the peak; None where a figure is missing."""
    if not flops_per_sample or not samples_per_s or not peak_flops_per_s:
        return None
    return flops_per_sample * samples_per_s / peak_flops_per_s

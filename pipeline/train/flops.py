"""Model FLOPs per sample and each rank's peak, written to config.json as run facts so that
`pipeline analyze` gives MFU offline (docs/analysis.md, "MFU").

The forward pass is counted by TensorFlow's profiler (`float_operation`: the per-op FLOPs
statistics TensorFlow registers for Conv2D, Conv3D, MatMul, depthwise convolutions, ...) on the
model's graph for one micro-batch, traced, never run. Model FLOPs are three times that: the
backward pass costs twice the forward (the gradients of the activations and of the weights),
as MFU counts it. Counting the backward graph's own ops is not used: TensorFlow's statistics
for Conv2DBackpropInput and Conv2DBackpropFilter count the full input-sized transposed
convolution (8.5 MFLOP where the default CNN does 5.5), and an implementation's extra work
(recomputation, padding) is not the model's.
"""

from __future__ import annotations

from pipeline.runtime import peak as peak_mod

# Ops with real arithmetic that TensorFlow registers no FLOPs for: named in flops_source.
UNCOUNTED = ("Einsum", "BatchMatMulV2", "BatchMatMulV3", "Conv3DBackpropInputV2", "XlaDot", "XlaConv")
BACKWARD_FACTOR = 3


def forward_flops(model, sample_shape, batch: int) -> tuple[float | None, str]:
    """(forward FLOPs per sample, how they were counted), or (None, why not)."""
    import tensorflow as tf
    from tensorflow.python.framework import ops
    from tensorflow.python.util import deprecation

    try:
        fn = tf.function(lambda x: model(x, training=False))
        graph = fn.get_concrete_function(tf.TensorSpec((batch, *sample_shape), tf.float32)).graph
    except Exception as e:  # noqa: BLE001 - a model that cannot be traced alone still trains
        return None, f"the forward pass could not be traced alone ({type(e).__name__})"
    total, missing = 0, set()
    with deprecation.silence():  # the statistics use TensorFlow 1's shape helpers, which warn
        for op in graph.get_operations():
            if op.type in UNCOUNTED:
                missing.add(op.type)
            try:
                total += ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0
            except ValueError:  # no statistics registered for this op type
                pass
    if not total:
        return None, "TensorFlow's profiler counted no FLOPs in the forward pass"
    how = "tf.profiler float_operation of the forward pass x 3 (backward = 2 x forward)"
    if missing:
        how += f"; not counted: {', '.join(sorted(missing))} (no FLOPs statistics in TensorFlow)"
    return total / batch, how


def model_facts(model, sample_shape, batch: int) -> dict:
    """config.json's model_flops_per_sample, forward_flops_per_sample and flops_source."""
    forward, how = forward_flops(model, sample_shape, batch)
    return {"model_flops_per_sample": BACKWARD_FACTOR * forward if forward else None,
            "forward_flops_per_sample": forward, "flops_source": how}


def rank_peak(threads: int, precision: str) -> peak_mod.Peak | None:
    """This rank's device peak: its GPU's entry of the table, else its CPU threads'."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if not gpus:
        return peak_mod.this_cpu(threads, precision)
    details = tf.config.experimental.get_device_details(gpus[0])
    tf32 = tuple(details.get("compute_capability") or (0, 0)) >= (8, 0) and \
        tf.config.experimental.tensor_float_32_execution_enabled()
    return peak_mod.gpu_peak(details.get("device_name", ""), precision, tf32)


def run_peak(per_rank: list) -> dict:
    """config.json's peak_flops_per_s (the sum over ranks; None when any rank's is unknown),
    peak_source and peak_device, from every rank's Peak (or None)."""
    if not per_rank or any(p is None for p in per_rank):
        unknown = [r for r, p in enumerate(per_rank) if p is None]
        return {"peak_flops_per_s": None, "peak_source": f"no peak known for rank(s) {unknown[:8]} (a device not "
                                                         f"in the table: docs/analysis.md)", "peak_device": None}
    first = per_rank[0]
    same = all(p.source == first.source for p in per_rank)
    source = f"{len(per_rank)} rank(s) x {first.source}" if same else \
        "ranks differ; rank 0: " + first.source
    return {"peak_flops_per_s": sum(p.flops_per_s for p in per_rank), "peak_source": source,
            "peak_device": first.device}

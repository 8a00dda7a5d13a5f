"""Model FLOPs per sample and the run's peak (pipeline/train/flops.py), on models whose FLOPs
are counted here by hand."""

import pytest

from pipeline.runtime.peak import Peak
from pipeline.train import flops


def test_a_dense_layers_flops_by_hand():
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.Dense(4, use_bias=False)])
    forward, how = flops.forward_flops(model, (8,), batch=16)
    assert forward == 2 * 8 * 4  # one multiply and one add per weight, per sample
    facts = flops.model_facts(model, (8,), 16)
    assert facts["model_flops_per_sample"] == 3 * 2 * 8 * 4 and "x 3" in facts["flops_source"]


def test_ops_without_flops_statistics_are_named():
    import tensorflow as tf

    class Mix(tf.keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 4))

        def call(self, x):
            return tf.einsum("bi,ij->bj", x, self.w)

    model = tf.keras.Sequential([tf.keras.layers.Input((8,)), Mix(), tf.keras.layers.Dense(2)])
    forward, how = flops.forward_flops(model, (8,), batch=4)
    assert forward == pytest.approx(2 * 4 * 2 + 2)  # the Dense layer's matmul and bias only
    assert "not counted: Einsum" in how


def test_the_runs_peak_is_the_sum_of_its_ranks():
    p = Peak(1e12, "1 thread(s) x ...", "CPU")
    assert flops.run_peak([p, p]) == {"peak_flops_per_s": 2e12, "peak_source": "2 rank(s) x 1 thread(s) x ...",
                                      "peak_device": "CPU"}
    unknown = flops.run_peak([p, None])
    assert unknown["peak_flops_per_s"] is None and "rank(s) [1]" in unknown["peak_source"]

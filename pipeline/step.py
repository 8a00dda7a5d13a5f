"""The compiled training step, with the knobs that change what one step does: gradient
accumulation (k micro-batches per update), fp16 gradient compression for the allreduce,
loss scaling for float16, and XLA.

Accumulation keeps the semantics of one pass at batch k*b: the k micro-batch gradients are
averaged (not summed) before the allreduce, so the same learning rate applies, and the
allreduce runs once per update, not once per micro-batch.
"""

from __future__ import annotations


def make_train_step(model, opt, loss_fn, dist, *, passes: int = 1, compression: str = "none",
                    jit_compile: bool = False, loss_scale: bool = False, prepare_x=None):
    """loss_fn(y, prediction) -> the batch's scalar loss; prepare_x turns the stored input into
    what the model sees (default: uint8 to [0, 1], other types to float32)."""
    import tensorflow as tf

    from .data.reader import to_float

    variables = model.trainable_variables
    prepare_x = prepare_x or to_float

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(prepare_x(x), training=True))
            scaled = opt.get_scaled_loss(loss) if loss_scale else loss
        return loss, tape, scaled

    # XLA compiles the forward and backward pass; Horovod's allreduce stays outside the
    # cluster (its ops have no XLA kernels unless Horovod was built with them).
    @tf.function(jit_compile=True)
    def local_grads_xla(x, y):
        loss, tape, scaled = forward_backward(x, y)
        return loss, tape.gradient(scaled, variables)

    def local_grads(x, y):
        if jit_compile:
            return local_grads_xla(x, y)
        loss, tape, scaled = forward_backward(x, y)
        return loss, tape.gradient(scaled, variables)

    @tf.function
    def train_step(xb, yb, stop):
        if passes == 1 and not jit_compile:
            loss, tape, scaled = forward_backward(xb, yb)
            # Horovod's tape averages the gradients over all ranks (ring-allreduce), each
            # gradient's allreduce starting as soon as backprop produces it.
            grads = dist.gradient_tape(tape, compression).gradient(scaled, variables)
        else:
            if passes == 1:
                loss, grads = local_grads(xb, yb)
            else:
                xs, ys = tf.split(xb, passes), tf.split(yb, passes)
                loss, grads = local_grads(xs[0], ys[0])
                for i in range(1, passes):
                    li, gi = local_grads(xs[i], ys[i])
                    loss += li
                    grads = [a + b for a, b in zip(grads, gi)]
                loss /= passes
                grads = [g / passes for g in grads]
            grads = dist.average_gradients(grads, compression)
        if loss_scale:
            grads = opt.get_unscaled_gradients(grads)
        opt.apply_gradients(zip(grads, variables))
        # Any rank's stop request reaches every rank in this same step.
        return loss, dist.sum_in_step(stop)

    return train_step

"""The optimizer named by train.optimizer, with its hyperparameters from the train section.

- `sgd`: Keras's SGD with `train.momentum` (default 0.9) and `train.nesterov`.
- `adam`, `adamw`: Keras's Adam and AdamW with `train.betas` and `train.epsilon`; AdamW's
  weight decay is decoupled (Loshchilov and Hutter, 2019).
- `lamb` (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in
  76 minutes", Algorithm 2) and `lars` (You, Gitman and Ginsburg, 2017, "Large Batch Training
  of Convolutional Networks", Algorithm 1): small implementations below, since TensorFlow 2.15
  has neither and tensorflow-addons (which had LAMB) reached its end of life in 2024; the
  tests hold each against the published update rule on fixed numbers.
- A user's own: `path/to/file.py:function` or `package.module:function`, called as
  `function(learning_rate, train)` (the schedule, and the config's train section), returning a
  Keras optimizer.

`train.weight_decay` is decoupled for every built-in: adamw, lamb and lars as their papers
define it; sgd and adam through Keras's own `weight_decay` (w -= lr * weight_decay * w, applied
before the update). Gradient clipping is not the optimizer's: the training step clips the
averaged gradient (pipeline/train/step.py), the same on every rank.
"""

from __future__ import annotations

from pipeline.config import BUILTIN_OPTIMIZERS

def build(train, learning_rate):
    """The Keras optimizer for the config's train section, on `learning_rate` (a schedule)."""
    import tensorflow as tf

    name, wd = train.optimizer, train.weight_decay or None
    b1, b2 = train.betas
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate, momentum=train.momentum, nesterov=train.nesterov,
                                       weight_decay=wd)
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate, beta_1=b1, beta_2=b2, epsilon=train.epsilon, weight_decay=wd)
    if name == "adamw":
        return tf.keras.optimizers.AdamW(learning_rate, weight_decay=train.weight_decay, beta_1=b1, beta_2=b2,
                                         epsilon=train.epsilon)
    if name == "lamb":
        return lamb(learning_rate, beta_1=b1, beta_2=b2, epsilon=train.epsilon, weight_decay=train.weight_decay)
    if name == "lars":
        return lars(learning_rate, momentum=train.momentum, weight_decay=train.weight_decay, eta=train.lars_trust)
    assert name not in BUILTIN_OPTIMIZERS, name
    return _user_optimizer(name, learning_rate, train)


def _user_optimizer(name: str, learning_rate, train):
    import tensorflow as tf

    from pipeline.errors import UserError
    from pipeline.train.models import load_function

    fn = load_function(name, "train.optimizer")
    try:
        opt = fn(learning_rate, train)
    except Exception as e:  # noqa: BLE001 - the user's code: name it, one line
        raise UserError(f"train.optimizer {name!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(opt, tf.keras.optimizers.Optimizer):
        raise UserError(f"train.optimizer {name!r} returned {type(opt).__name__}, not a tf.keras optimizer "
                        f"(tf.keras.optimizers.Optimizer)")
    return opt


def _norm(x):
    import tensorflow as tf

    return tf.norm(tf.reshape(x, [-1]))


def _trust(w_norm, u_norm):
    """w_norm / u_norm, or 1 where either is zero (a fresh zero tensor, a zero update)."""
    import tensorflow as tf

    return tf.where((w_norm > 0) & (u_norm > 0), w_norm / tf.maximum(u_norm, 1e-38), tf.ones_like(w_norm))


def lamb(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-6, weight_decay=0.0, name="LAMB"):
    """LAMB: per layer, the Adam direction plus decoupled weight decay, scaled by the trust
    ratio ||w|| / ||update||:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        w = w - lr * (||w|| / ||r||) * r
    """
    import tensorflow as tf

    class LAMB(tf.keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(name=name, jit_compile=False)
            self._learning_rate = self._build_learning_rate(learning_rate)
            self.beta_1, self.beta_2, self.epsilon, self.decay = beta_1, beta_2, epsilon, weight_decay

        def build(self, var_list):
            super().build(var_list)
            if getattr(self, "_built", False):
                return
            self._built = True
            self._m = [self.add_variable_from_reference(model_variable=v, variable_name="m") for v in var_list]
            self._v = [self.add_variable_from_reference(model_variable=v, variable_name="v") for v in var_list]

        def update_step(self, gradient, variable):
            dtype = variable.dtype
            lr = tf.cast(self.learning_rate, dtype)
            t = tf.cast(self.iterations + 1, dtype)
            i = self._index_dict[self._var_key(variable)]
            m, v = self._m[i], self._v[i]
            g = tf.convert_to_tensor(gradient)
            m.assign(self.beta_1 * m + (1 - self.beta_1) * g)
            v.assign(self.beta_2 * v + (1 - self.beta_2) * tf.square(g))
            m_hat = m / (1 - tf.pow(tf.cast(self.beta_1, dtype), t))
            v_hat = v / (1 - tf.pow(tf.cast(self.beta_2, dtype), t))
            r = m_hat / (tf.sqrt(v_hat) + self.epsilon) + self.decay * variable
            variable.assign_sub(lr * _trust(_norm(variable), _norm(r)) * r)

        def get_config(self):
            config = super().get_config()
            config.update(learning_rate=self._serialize_hyperparameter(self._learning_rate), beta_1=self.beta_1,
                          beta_2=self.beta_2, epsilon=self.epsilon, weight_decay=self.decay)
            return config

    return LAMB()


def lars(learning_rate=0.1, momentum=0.9, weight_decay=0.0, eta=0.001, name="LARS"):
    """LARS with momentum: per layer, a local rate from the trust coefficient eta,

        local = eta * ||w|| / (||g|| + weight_decay * ||w||)   (1 where ||w|| or ||g|| is 0)
        u = momentum * u + lr * local * (g + weight_decay * w);  w = w - u
    """
    import tensorflow as tf

    class LARS(tf.keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(name=name, jit_compile=False)
            self._learning_rate = self._build_learning_rate(learning_rate)
            self.momentum, self.decay, self.eta = momentum, weight_decay, eta

        def build(self, var_list):
            super().build(var_list)
            if getattr(self, "_built", False):
                return
            self._built = True
            self._u = [self.add_variable_from_reference(model_variable=v, variable_name="u") for v in var_list]

        def update_step(self, gradient, variable):
            dtype = variable.dtype
            lr = tf.cast(self.learning_rate, dtype)
            u = self._u[self._index_dict[self._var_key(variable)]]
            g = tf.convert_to_tensor(gradient)
            w_norm, g_norm = _norm(variable), _norm(g)
            local = tf.where((w_norm > 0) & (g_norm > 0),
                             self.eta * w_norm / tf.maximum(g_norm + self.decay * w_norm, 1e-38), tf.ones_like(w_norm))
            u.assign(self.momentum * u + lr * local * (g + self.decay * variable))
            variable.assign_sub(u)

        def get_config(self):
            config = super().get_config()
            config.update(learning_rate=self._serialize_hyperparameter(self._learning_rate), momentum=self.momentum,
                          weight_decay=self.decay, eta=self.eta)
            return config

    return LARS()

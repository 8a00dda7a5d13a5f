"""Models by name. The classifiers (cnn, mlp, resnet20, keras.applications.*) take the
sample shape and the class count; cosmoflow, segnet and a user's own builder
(path/to/file.py:function or package.module:function) are called as
function(input_shape, target_shape, num_classes, **model.args)."""

from __future__ import annotations

from pathlib import Path

from pipeline import stack
from pipeline.config import APPLICATIONS_PREFIX, BUILTIN_MODELS


def cnn(input_shape, num_classes):
    """The default: the small Keras CNN from TensorFlow's tutorials, logits out."""
    import tensorflow as tf
    from tensorflow.keras import layers

    return tf.keras.Sequential([
        layers.Input(shape=input_shape),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(num_classes),
    ], name="cnn")


def mlp(input_shape, num_classes):
    """The tabular / recommendation-style model: inputs (e.g. 256 features) -> 128 -> 64 ->
    classes. Cheap to compute, so its runs are communication-bound sooner."""
    import tensorflow as tf
    from tensorflow.keras import layers

    return tf.keras.Sequential([
        layers.Input(shape=input_shape),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(64, activation="relu"),
        layers.Dense(num_classes),
    ], name="mlp")


def resnet20(input_shape, num_classes):
    """ResNet-20 for 32x32x3 (He et al. 2016, section 4.2): 3 stages of 3 basic blocks,
    16/32/64 filters, global average pooling; ~0.27 M parameters."""
    import tensorflow as tf
    from tensorflow.keras import layers

    def conv(x, filters, stride=1):
        return layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal")(x)

    def block(x, filters, stride):
        y = layers.ReLU()(layers.BatchNormalization()(conv(x, filters, stride)))
        y = layers.BatchNormalization()(conv(y, filters))
        if stride != 1 or x.shape[-1] != filters:
            x = layers.BatchNormalization()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
        return layers.ReLU()(layers.Add()([x, y]))

    inputs = layers.Input(shape=input_shape)
    x = layers.ReLU()(layers.BatchNormalization()(conv(inputs, 16)))
    for stage, filters in enumerate((16, 32, 64)):
        for i in range(3):
            x = block(x, filters, 2 if (i == 0 and stage > 0) else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, layers.Dense(num_classes)(x), name="resnet20")


def keras_application(name: str, input_shape, num_classes):
    """Any tf.keras.applications model by class name, untrained (weights=None), logits out,
    e.g. keras.applications.MobileNetV2 at 224x224x3 for comparison with Horovod's
    synthetic benchmark on the same model."""
    import tensorflow as tf

    from pipeline.errors import UserError

    cls_name = name.rsplit(".", 1)[-1]
    cls = getattr(tf.keras.applications, cls_name, None)
    if cls is None or not callable(cls):
        raise UserError(f"model.name {name!r}: tf.keras.applications has no model {cls_name!r}")
    try:
        return cls(weights=None, input_shape=tuple(input_shape), classes=num_classes, classifier_activation=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"model.name {name!r} does not fit the dataset's shape {tuple(input_shape)} and "
                        f"{num_classes} classes: {str(e).splitlines()[0]}") from None


def cosmoflow(input_shape, target_shape, num_classes, conv_layers: int = 4, filters: int = 8, kernel: int = 2,
              dense: tuple = (64, 32), dropout: float = 0.0, scale: float = 1.2):
    """The MLPerf HPC CosmoFlow reference architecture: 3D convolutions whose filters double
    per layer (kernel 2, same padding, LeakyReLU, max-pool 2), two dense layers, a tanh
    output scaled by 1.2 (the targets lie in [-1, 1]). The reference uses 5 layers from 32
    filters on 128^3; the defaults here suit small sub-volumes."""
    import tensorflow as tf
    from tensorflow.keras import layers

    if num_classes is not None or len(target_shape) != 1:
        raise ValueError(f"cosmoflow regresses a vector of parameters; the targets are {target_shape}"
                         + (f" class ids of {num_classes} classes" if num_classes else ""))
    def leaky(x):
        # LeakyReLU(0.3) as max(x, 0.3x): the same function, without the Conv3D+BiasAdd+LeakyRelu
        # fusion that TensorFlow 2.15's grappler remapper fails on (it logs an error per step).
        return layers.Lambda(lambda t: tf.maximum(t, 0.3 * t))(x)

    inputs = layers.Input(shape=input_shape)
    x = inputs
    for i in range(conv_layers):
        x = leaky(layers.Conv3D(filters * 2 ** i, kernel, padding="same")(x))
        x = layers.MaxPooling3D(2, padding="same")(x)
    x = layers.Flatten()(x)
    for units in dense:
        x = leaky(layers.Dense(units)(x))
        if dropout:
            x = layers.Dropout(dropout)(x)
    out = layers.Dense(target_shape[0], activation="tanh")(x)
    out = layers.Rescaling(scale)(out)
    return tf.keras.Model(inputs, out, name="cosmoflow")


def segnet(input_shape, target_shape, num_classes, filters: int = 16, depth: int = 2):
    """A small U-Net-style per-pixel classifier: `depth` stride-2 stages down, the same up with
    skip connections, per-pixel logits. H and W must divide by 2**depth."""
    import tensorflow as tf
    from tensorflow.keras import layers

    if not num_classes or tuple(target_shape) != tuple(input_shape[:-1]):
        raise ValueError(f"segnet labels every pixel: targets must be {tuple(input_shape[:-1])} class ids, "
                         f"they are {tuple(target_shape)}" + ("" if num_classes else " values (no --num-classes)"))

    def conv(x, f):
        return layers.Conv2D(f, 3, padding="same", activation="relu")(x)

    inputs = layers.Input(shape=input_shape)
    x, skips = inputs, []
    for d in range(depth):
        x = conv(conv(x, filters * 2 ** d), filters * 2 ** d)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv(x, filters * 2 ** depth)
    for d in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2 ** d, 2, strides=2, padding="same")(x)
        x = conv(layers.Concatenate()([x, skips[d]]), filters * 2 ** d)
    return tf.keras.Model(inputs, layers.Conv2D(num_classes, 1)(x), name="segnet")


MODELS = {"cnn": cnn, "mlp": mlp, "resnet20": resnet20}
# Built-ins called as function(input_shape, target_shape, num_classes, **model.args), like a user's.
TASK_MODELS = {"cosmoflow": cosmoflow, "segnet": segnet}
# config.py lists the same names (model.name is checked when the config is loaded).
assert set(MODELS) | set(TASK_MODELS) == set(BUILTIN_MODELS), "pipeline/config.py's BUILTIN_MODELS and the builders differ"


def _user_builder(name: str):
    """The function named by model.name: a .py file's or an importable module's."""
    return load_function(name, "model.name")


def load_function(name: str, key: str):
    """The function `name` names (path/to/file.py:function or package.module:function), for
    config key `key` (named in the one-line errors)."""
    import importlib
    import importlib.util

    from pipeline.errors import UserError

    where, _, func = name.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"{key} {name!r}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"pipeline_user_{key.split('.')[-1]}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"{key} {name!r}: {path} failed to load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"{key} {name!r}: cannot import {where} ({e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"{key} {name!r}: {where} has no function {func!r}")
    return fn


def expected_output(target_shape, num_classes) -> tuple:
    """The output shape (without the batch axis) that fits the targets: logits per class for
    class ids, else the target's own shape."""
    return tuple(target_shape) + ((num_classes,) if num_classes else ())


def build(name: str, input_shape, num_classes, output_dtype: str | None = None, *, target_shape=(),
          args: dict | None = None):
    """The model, with its output in float32 whatever the precision policy (softmax and the
    loss in float16 lose accuracy; Keras's mixed-precision guide does the same). A model that
    cannot be built for the data, or whose output does not fit the targets, is a user error
    naming model.name and both shapes."""
    import tensorflow as tf

    from pipeline.errors import UserError

    args = dict(args or {})
    input_shape, target_shape = tuple(input_shape), tuple(target_shape)
    shapes = f"input {input_shape}, targets {target_shape}" + (f" of {num_classes} classes" if num_classes else "")
    if name.startswith(APPLICATIONS_PREFIX):
        model = keras_application(name, input_shape, num_classes)
    elif name in MODELS:
        if args:
            raise UserError(f"model.args: the built-in {name!r} takes none, got {sorted(args)}")
        if not num_classes or target_shape:
            raise UserError(f"model.name {name!r} classifies whole samples; the data has {shapes} "
                            f"(cosmoflow and segnet, or your own model, fit other targets)")
        model = MODELS[name](input_shape, num_classes)
    else:
        fn = TASK_MODELS.get(name) or _user_builder(name)
        try:
            model = fn(input_shape, target_shape, num_classes, **args)
        except Exception as e:
            raise UserError(f"model.name {name!r} could not be built for {shapes}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        keras3 = stack.keras3_object(model)
        if keras3 and not isinstance(model, tf.keras.Model):
            raise UserError(f"model.name {name!r}: {name.rpartition(':')[0]} built a Keras {keras3} model "
                            f"(import keras), which Horovod 0.28.1 cannot train; build it with tf.keras "
                            f"(from tensorflow import keras) so it is Keras 2 (docs/setup.md, the stacks)")
        if not isinstance(model, tf.keras.Model):
            raise UserError(f"model.name {name!r} returned {type(model).__name__}, not a Keras model")
    got, want = tuple(model.output_shape[1:]), expected_output(target_shape, num_classes)
    if got != want:
        raise UserError(f"model.name {name!r}: output shape {got} does not fit the targets ({shapes}: "
                        f"expected {want})")
    if output_dtype and model.output.dtype != output_dtype:
        out = tf.keras.layers.Activation("linear", dtype=output_dtype, name="logits_float32")(model.output)
        model = tf.keras.Model(model.inputs, out, name=model.name)
    return model

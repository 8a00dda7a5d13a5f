"""Models by name. Each builder takes the sample shape and the class count from the manifest."""

from __future__ import annotations


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

    from .errors import UserError

    cls_name = name.rsplit(".", 1)[-1]
    cls = getattr(tf.keras.applications, cls_name, None)
    if cls is None or not callable(cls):
        raise UserError(f"model.name {name!r}: tf.keras.applications has no model {cls_name!r}")
    try:
        return cls(weights=None, input_shape=tuple(input_shape), classes=num_classes, classifier_activation=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"model.name {name!r} does not fit the dataset's shape {tuple(input_shape)} and "
                        f"{num_classes} classes: {str(e).splitlines()[0]}") from None


MODELS = {"cnn": cnn, "mlp": mlp, "resnet20": resnet20}
APPLICATIONS_PREFIX = "keras.applications."


def known(name: str) -> bool:
    return name in MODELS or (name.startswith(APPLICATIONS_PREFIX) and len(name) > len(APPLICATIONS_PREFIX))


def build(name: str, input_shape, num_classes, output_dtype: str | None = None):
    """The model, with logits in float32 whatever the precision policy (softmax and the loss
    in float16 lose accuracy; Keras's mixed-precision guide does the same)."""
    if name.startswith(APPLICATIONS_PREFIX):
        model = keras_application(name, input_shape, num_classes)
    else:
        model = MODELS[name](tuple(input_shape), num_classes)
    if output_dtype and model.output.dtype != output_dtype:
        import tensorflow as tf

        out = tf.keras.layers.Activation("linear", dtype=output_dtype, name="logits_float32")(model.output)
        model = tf.keras.Model(model.inputs, out, name=model.name)
    return model

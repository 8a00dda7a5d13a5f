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
    """A two-layer perceptron: a cheap model for tests and communication-bound runs."""
    import tensorflow as tf
    from tensorflow.keras import layers

    return tf.keras.Sequential([
        layers.Input(shape=input_shape),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(num_classes),
    ], name="mlp")


MODELS = {"cnn": cnn, "mlp": mlp}


def build(name: str, input_shape, num_classes):
    return MODELS[name](tuple(input_shape), num_classes)

"""What is learned: the inputs as the model sees them, the targets, the loss and the metrics,
from the config's train and data sections and the manifest.

- Inputs: uint8 to [0, 1] (other types as stored) then `data.transform`: `log1p` (counts,
  as CosmoFlow) or `standardize` (per channel, mean and std of the training split from
  `pipeline data stats`). Applied inside the compiled step, so the raw type travels.
- Targets: class ids (the manifest has `num_classes`, for whole samples or every pixel) or
  values (regression).
- Loss: any Keras loss by name, applied to logits for the cross-entropies unless
  `train.from_logits` is false. The training loss is the mean over every element; the
  validation loss is the same mean over the whole validation split, from sums and counts.
- Metrics: class targets always get accuracy; `train.metrics` adds Keras metrics by name,
  and `mean_iou`. Every metric here keeps sums (or a confusion matrix) as its state, so
  summing the state over ranks gives the exact figure over the whole split.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

STATS = "stats.json"


def load_stats(data_dir: Path) -> dict:
    path = Path(data_dir) / STATS
    try:
        stats = json.loads(path.read_text())
        mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; data.transform=standardize needs the training split's statistics: "
                        f"pipeline data stats {data_dir}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a pipeline data stats result; make it again: pipeline data stats {data_dir}") \
            from None
    return {"mean": mean, "std": np.where(std > 0, std, 1.0).astype(np.float32)}


class Task:
    def __init__(self, train, data, manifest):
        self.num_classes = manifest.num_classes
        self.input_shape, self.target_shape = tuple(manifest.shape), tuple(manifest.y_shape)
        self.classification = self.num_classes is not None
        self.transform = data.transform
        self.stats = load_stats(manifest.dir) if self.transform == "standardize" else None
        if self.stats is not None and self.stats["mean"].shape != (self.input_shape[-1],):
            raise UserError(f"{manifest.dir / STATS}: {self.stats['mean'].shape[0]} channels, the data has "
                            f"{self.input_shape[-1]}; make it again: pipeline data stats {manifest.dir}")
        self.loss_name, self.from_logits = train.loss, train.from_logits
        self.metric_names = list(train.metrics)
        self._values = _loss_values(train.loss, train.from_logits)
        if "mean_iou" in self.metric_names and not self.classification:
            raise UserError("train.metrics: mean_iou needs class ids as targets (index with --num-classes)")
        # Built now, so an unknown name fails before training, on every rank alike.
        self.metrics = self._build_metrics()

    def prepare_x(self, x):
        import tensorflow as tf

        x = tf.cast(x, tf.float32) * (1.0 / 255.0) if x.dtype == tf.uint8 else tf.cast(x, tf.float32)
        if self.transform == "log1p":
            return tf.math.log1p(x)
        if self.transform == "standardize":
            return (x - self.stats["mean"]) / self.stats["std"]
        return x

    def prepare_y(self, y):
        import tensorflow as tf

        return tf.cast(y, tf.int32) if self.classification else tf.cast(y, tf.float32)

    def loss_values(self, y, pred):
        """The loss per element (per sample, or per pixel), unreduced; `y` as prepare_y gives it."""
        return self._values(y, pred)

    def loss(self, y, pred):
        """The training loss: the mean over every element of the batch, from the stored `y`."""
        import tensorflow as tf

        return tf.reduce_mean(self._values(self.prepare_y(y), pred))

    def _build_metrics(self) -> list[tuple[str, object]]:
        """The metric objects, as (name written as val_<name>, Keras metric)."""
        import tensorflow as tf

        out = []
        if self.classification:
            out.append(("accuracy", tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")))
        for name in self.metric_names:
            if name in ("accuracy", "acc") and self.classification:
                continue  # already there
            if name == "mean_iou":
                out.append((name, tf.keras.metrics.MeanIoU(self.num_classes, sparse_y_true=True,
                                                           sparse_y_pred=False, name=name)))
                continue
            try:
                m = tf.keras.metrics.get(name)
            except ValueError:
                raise UserError(f"train.metrics: {name!r} is not a Keras metric (e.g. mae, mse, "
                                f"sparse_top_k_categorical_accuracy) nor mean_iou") from None
            if not isinstance(m, tf.keras.metrics.Metric):
                m = tf.keras.metrics.MeanMetricWrapper(m, name=name)
            out.append((name, m))
        return out


def _loss_values(name: str, from_logits: bool):
    """An unreduced loss function by Keras name; cross-entropies told whether they get logits."""
    import tensorflow as tf

    try:
        fn = tf.keras.losses.get(name)
    except ValueError:
        raise UserError(f"train.loss: {name!r} is not a Keras loss (e.g. sparse_categorical_crossentropy, mse, "
                        f"mae, binary_crossentropy)") from None
    if isinstance(fn, tf.keras.losses.Loss):
        config = {"reduction": "none"}
        if "from_logits" in fn.get_config():
            config["from_logits"] = from_logits
        return type(fn).from_config({**fn.get_config(), **config})
    if "from_logits" in inspect.signature(fn).parameters:
        return lambda y, p: fn(y, p, from_logits=from_logits)
    return fn

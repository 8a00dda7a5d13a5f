"""`pipeline` command line: parses arguments and calls one function per verb, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.errors import EXIT_USER_ERROR, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W,C or F integers, got {text!r}") from None


def cmd_data_synth(a) -> int:
    if a.kind != "images":
        from pipeline.data.synth_layouts import synth_layout

        synth_layout(a.kind, a.out, a.samples, a.shape, a.seed)
        return 0
    from pipeline.data.synth import synth

    synth(a.out, a.samples or 20000, a.val_samples, a.shards, a.val_shards, a.shape or (28, 28, 1), a.classes,
          a.seed, a.chunk_samples, a.compression, a.dtype)
    return 0


def cmd_data_index(a) -> int:
    from pipeline.data.index import index

    index(a.src, a.out, a.x, a.y, a.per_file, a.subvolume, a.val_fraction, a.val, a.num_classes, a.checksums,
          a.seed)
    return 0


def cmd_data_stats(a) -> int:
    from pipeline.data.stats import stats

    stats(a.dir, a.root)
    return 0


def cmd_data_convert(a) -> int:
    from pipeline.data.convert import convert

    convert(a.format, a.src, a.out, a.shards, a.val_shards, a.val_fraction, a.seed, a.chunk_samples,
            a.compression, a.dtype)
    return 0


def cmd_data_verify(a) -> int:
    from pipeline.data import shards

    m = shards.load_manifest(a.dir, a.root)
    problems = list(shards.verify(m, checksums=not a.fast))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return EXIT_USER_ERROR
    n = sum(len(m.shards(s)) for s in m.splits)
    print(f"{m.dir}: {n} {'files' if m.indexed else 'shards'} match the manifest ({', '.join(f'{s}={m.num_samples(s)}' for s in m.splits)})")
    return 0


def cmd_train(a) -> int:
    from pipeline import config
    from pipeline.train import trainer as train

    from pipeline.errors import EXIT_OK, EXIT_REQUEUE

    cfg = config.load(a.config, a.set or [])
    summary = train.run(cfg, a.run_dir)
    return EXIT_REQUEUE if summary["status"] == "stopped" else EXIT_OK


def cmd_analyze(a) -> int:
    from pipeline.analysis import report

    if a.leaderboard:
        from pipeline.cluster import leaderboard

        if a.run_dirs:
            raise UserError("--leaderboard DIR takes the sweep directory alone, not run directories besides it")
        board = leaderboard.build(a.leaderboard, a.target if a.target_given else None)
        if a.report:
            board["report"] = str(leaderboard.write_report(a.report, board))
        return _emit(board, a.json, leaderboard.text)
    if not a.run_dirs:
        raise UserError("pipeline analyze: give one or more run directories, or --leaderboard DIR")
    result = report.analyze(a.run_dirs, target=a.target, plots_dir=a.plots, report=a.report, compare=a.compare,
                            link_gbps=a.link_gbps, comm_file=a.comm, compute_ms=a.compute_ms)
    return _emit(result, a.json, report.text)


def _emit(result: dict, as_json: bool, text) -> int:
    """One JSON object on stdout (--json), or the command's text form of it."""
    if as_json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text(result))
    return 0


def cmd_sweep(a) -> int:
    from pipeline.cluster import sweep

    if a.status:
        return sweep.status(a.status)
    if not a.out:
        raise UserError("pipeline sweep: give --out DIR (or --status DIR)")
    try:
        ranks = [int(x) for x in a.ranks.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ranks {a.ranks!r}: expected rank counts such as 1,2,4") from None
    return sweep.run(a.config, a.out, a.grid or [], a.grid_file, ranks, a.set or [], repeats=a.repeats,
                     sbatch_args=a.sbatch_args, max_parallel=a.max_parallel, target=a.target, local=a.local,
                     retry_failed=a.retry_failed)


def cmd_doctor(a) -> int:
    from pipeline import config
    from pipeline.cluster import doctor

    cfg = config.load(a.config, a.set or [])
    return doctor.run(cfg, a.run_dir, system_json=a.system_json)


def cmd_postmortem(a) -> int:
    from pipeline.analysis import postmortem

    if not Path(a.run_dir).is_dir():
        raise UserError(f"{a.run_dir}: no such run directory")
    return _emit(postmortem.analyze(a.run_dir), a.json, postmortem.text)


def cmd_export_tflite(a) -> int:
    from pipeline.train.export import tflite_int8

    r = tflite_int8(a.run_dir, samples=a.samples)
    print(f"{r['tflite']}: {r['tflite_bytes'] / 1024:.0f} KiB (Keras {r['keras_bytes'] / 1024:.0f} KiB); "
          f"val accuracy int8 {r['int8_accuracy']:.4f} vs float {r['float_accuracy']:.4f} on {r['samples']} "
          f"samples; single-sample latency int8 {r['int8_latency_ms']:.3f} ms vs float {r['float_latency_ms']:.3f} ms")
    return 0


def cmd_checkpoint_digest(a) -> int:
    from pipeline.train.checkpoint import digest

    step, sha = digest(a.run_dir)
    print(f"step {step} sha256 {sha}")
    return 0


def cmd_checkpoint_list(a) -> int:
    from pipeline.train.checkpoint import list_complete
    from pipeline.rundir import RunDir

    directory = RunDir(a.run_dir).checkpoints
    refs = list_complete(directory)
    if not refs:
        raise UserError(f"{directory}: no complete checkpoint")
    for r in refs:
        print(f"step {r.step:>8} epoch {r.meta.get('epoch', '?'):>4} {r.path}")
    return 0


def _writer_options(p) -> None:
    p.add_argument("--chunk-samples", type=int, default=256, help="HDF5 chunk length in samples (default 256)")
    p.add_argument("--compression", default="none", help="none | lzf | gzip | gzip:LEVEL (default none)")
    p.add_argument("--dtype", default="uint8", help="stored pixel type: uint8 | float16 | float32 (default uint8)")


def cmd_bench_data(a) -> int:
    from pipeline.bench import data

    if a.layouts:
        rows = data.layouts(a.work, a.repeats)
        return 0 if all(r["met"] for r in rows) else 1
    if not a.dir:
        raise UserError("pipeline bench data: give a dataset directory, or --layouts")
    data.run(a.dir, a.batch_size, a.repeats, a.read_block, a.shuffle_buffer, a.threads, a.json)
    return 0


def cmd_bench_convert(a) -> int:
    from pipeline.bench import convert

    return 0 if convert.run(a.gib, a.work, a.keep)["bounded"] else 1


def cmd_bench_analyze(a) -> int:
    from pipeline.bench import analyze

    return 0 if analyze.run(a.ranks, a.steps, a.work)["met"] else 1


def cmd_bench_comm(a) -> int:
    from pipeline.bench import comm

    return comm.run(a.bytes, a.link_gbps, a.repeats, out=a.out)


def cmd_bench_multinode(a) -> int:
    from pipeline.bench import multinode

    rates = [r for r in a.rates.split(",") if r]
    return 0 if multinode.run(a.out, rates, a.calibrate, a.steps, a.data)["met"] else 1


def cmd_predict(a) -> int:
    from pipeline.analysis import commmodel

    net = commmodel.load_network(a.link_gbps, a.comm, alpha_s=a.alpha_ms / 1e3 if a.alpha_ms is not None else None,
                   latency_s=a.latency_us / 1e6 if a.latency_us is not None else None, efficiency=a.efficiency,
                   host_gbps=a.host_gbps)
    rows = commmodel.projection(a.gradient_bytes, a.compute_ms / 1e3, a.ranks_per_host, net)
    if a.json:
        json.dump({"network": commmodel.as_dict(net), "gradient_bytes": a.gradient_bytes,
                   "compute_s": a.compute_ms / 1e3, "ranks_per_host": a.ranks_per_host, "rows": rows}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print("\n".join(commmodel.table_lines(rows, f"{a.gradient_bytes:,} gradient bytes/step, compute "
                                                   f"{a.compute_ms:g} ms/step, {a.ranks_per_host} ranks/host, "
                                                   f"{net.link_gbps:g} Gbit/s x {net.efficiency:.3f}, alpha "
                                                   f"{net.alpha_s * 1e3:.3f} ms, latency {net.latency_s * 1e6:.1f} us"
                                                   + (f", host rate {net.host_gbps:g} Gbit/s"
                                                      + (" (bounds the transfer)" if net.host_bound else "")
                                                      if net.host_gbps else ""))))
    return 0


def cmd_bench_run(a) -> int:
    from pipeline.bench import suite

    ranks = [int(x) for x in a.ranks.split(",")] if a.ranks else None
    suite.run(a.out, quick=a.quick, ranks=ranks, repeats=a.repeats, steps=a.steps, batch=a.batch_size)
    return 0


def cmd_bench_knobs(a) -> int:
    from pipeline.bench import knobs

    knobs.run(a.out, a.ranks, a.epochs, a.repeats)
    return 0


def cmd_bench_ttt(a) -> int:
    from pipeline.bench import ttt

    r = ttt.run(a.config, a.out, runs=a.runs, ranks=a.ranks, limit_s=a.time_limit, sets=a.set or [])
    return 0 if r["score_s"] is not None else 1


def cmd_bench_layout(a) -> int:
    from pipeline.bench import layout

    layout.run(a.samples, repeats=a.repeats, work=a.work)
    return 0


def cmd_slurm_command(a) -> int:
    from pipeline.cluster import launch

    env = dict(os.environ)
    program = a.program[1:] if a.program[:1] == ["--"] else a.program
    if a.hostfile:
        hosts, counts = launch.hostfile(a.hostfile)
        cmd = launch.command(a.launcher, env, hosts, program, a.ntasks, counts=counts)
    else:
        if "SLURM_JOB_NODELIST" not in env:
            raise UserError("not inside a SLURM allocation (SLURM_JOB_NODELIST is not set); give --hostfile")
        cmd = launch.command(a.launcher, env, launch.expand_hostnames(env["SLURM_JOB_NODELIST"]), program, a.ntasks)
    # NUL-separated, so the batch script can run it with any arguments intact (mapfile -d '').
    sys.stdout.write("\0".join(cmd) + "\0")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pipeline", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    data = verbs.add_parser("data", help="make, convert and check datasets").add_subparsers(
        dest="data_verb", required=True, parser_class=_Parser)
    s = data.add_parser("synth", help="write a learnable synthetic image dataset as HDF5 shards, or small "
                                      "datasets in the CosmoFlow and DeepCAM raw layouts to index")
    s.add_argument("--kind", choices=["images", "cosmoflow", "segmentation"], default="images",
                   help="images (default): shards ready to train on; cosmoflow | segmentation: raw files in "
                        "those layouts, to be indexed with pipeline data index (docs/your-data.md)")
    s.add_argument("--out", required=True, help="dataset directory to create")
    s.add_argument("--samples", type=int, default=None,
                   help="training samples (default 20000); with --kind: files (cosmoflow 64, segmentation 240)")
    s.add_argument("--val-samples", type=int, default=2000, help="validation samples (default 2000)")
    s.add_argument("--shards", type=int, default=4, help="training shards (default 4)")
    s.add_argument("--val-shards", type=int, default=1, help="validation shards (default 1)")
    s.add_argument("--shape", type=_shape, default=None,
                   help="H,W,C images (default 28,28,1), or F for tabular rows of F features; cosmoflow: the "
                        "volume's side D (default 32); segmentation: H,W,C (default 64,64,4)")
    s.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    s.add_argument("--seed", type=int, default=0)
    _writer_options(s)
    s.set_defaults(func=cmd_data_synth)
    cv = data.add_parser("convert", help="convert mnist.npz, MNIST/Fashion-MNIST IDX or CIFAR-10 binary to shards")
    cv.add_argument("--format", required=True, choices=["npz", "idx", "cifar10"])
    cv.add_argument("--src", required=True, help="npz file; IDX directory; CIFAR-10 directory or .tar.gz")
    cv.add_argument("--out", required=True, help="dataset directory to create")
    cv.add_argument("--shards", type=int, default=4, help="training shards (default 4)")
    cv.add_argument("--val-shards", type=int, default=1, help="validation shards (default 1)")
    cv.add_argument("--val-fraction", type=float, default=None,
                    help="hold out this fraction of training samples when the source has no test split (default 0.1)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw")
    _writer_options(cv)
    cv.set_defaults(func=cmd_data_convert)
    v = data.add_parser("verify", help="check every shard (or indexed file) against manifest.json")
    v.add_argument("dir")
    v.add_argument("--fast", action="store_true", help="skip the sha256 checksums")
    v.add_argument("--root", help="where an indexed dataset's files are now (as data.root)")
    v.set_defaults(func=cmd_data_verify)
    ix = data.add_parser("index", help="a manifest over your own HDF5 files, in place (nothing copied)")
    ix.add_argument("src", nargs="+", metavar="SRC", help="files, directories (every .h5/.hdf5 below) or globs")
    ix.add_argument("--out", required=True, help="directory for manifest.json (the files stay where they are)")
    ix.add_argument("--x", required=True, metavar="KEY", help="the input dataset, e.g. full or climate/data")
    ix.add_argument("--y", required=True, metavar="KEY", help="the target dataset, e.g. unitPar or climate/labels_0")
    ix.add_argument("--per-file", choices=["many", "one"], default="many",
                    help="many (default): axis 0 is the sample axis of both keys; one: each file is one sample")
    ix.add_argument("--subvolume", type=int, metavar="S",
                    help="each S-cube (or S-square) of a file's x is one sample with the file's y")
    vs = ix.add_mutually_exclusive_group()
    vs.add_argument("--val-fraction", type=float, help="validation files, drawn by file (default 0.1)")
    vs.add_argument("--val", nargs="+", metavar="SRC", help="the validation files instead")
    ix.add_argument("--num-classes", type=int, help="the targets are class ids 0..C-1 (else values: regression)")
    ix.add_argument("--checksums", action="store_true", help="record each file's sha256 (reads every byte)")
    ix.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    ix.set_defaults(func=cmd_data_index)
    st = data.add_parser("stats", help="per-channel mean and std of the training split (data.transform: standardize)")
    st.add_argument("dir")
    st.add_argument("--root", help="where an indexed dataset's files are now (as data.root)")
    st.set_defaults(func=cmd_data_stats)

    t = verbs.add_parser("train", help="one training run (alone, or under mpirun / srun / horovodrun)")
    t.add_argument("--config", help="YAML config (default: built-in defaults, see configs/default.yaml)")
    t.add_argument("--run-dir", required=True, help="where logs, metrics and checkpoints go; resumes if present")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.batch_size=128")
    t.set_defaults(func=cmd_train)

    an = verbs.add_parser("analyze", help="throughput, step-time percentiles, data wait, stragglers, scaling and "
                                          "time to accuracy from run directories")
    an.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    an.add_argument("--leaderboard", metavar="DIR", help="a sweep directory (pipeline sweep --out): one row per "
                                                         "point, ranked by time to --target, the Pareto front marked")
    an.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the text summary")
    an.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    an.add_argument("--report", metavar="FILE", help="one page with summary, tables and plots (.html or .md)")
    an.add_argument("--target", default=_TargetDefault("0.9"), help="the quality for time to target: METRIC>=X or METRIC<=X with "
                                                    "any val_<name> of metrics.jsonl (val_mae<=0.2); a number X "
                                                    "means val_accuracy>=X (default 0.9)")
    an.add_argument("--compare", action="store_true", help="two run directories A B: the differences, figure by figure")
    an.add_argument("--link-gbps", type=float, help="per-host link rate: add the communication model's prediction "
                                                    "next to the measured figures (docs/multinode.md)")
    an.add_argument("--comm", metavar="FILE", help="alpha, latency and efficiency from pipeline bench comm --out FILE")
    an.add_argument("--compute-ms", type=float, help="compute time per step without communication (default: a "
                                                     "1-rank run among the run directories)")
    an.set_defaults(func=cmd_analyze)

    sw = verbs.add_parser("sweep", help="a grid of runs: one SLURM job array per rank count (or in turn with "
                                        "--local), then a leaderboard; running it again runs only what is missing")
    sw.add_argument("--config", help="YAML config every point starts from")
    sw.add_argument("--out", help="the sweep directory: one run directory per point, sweep.json, the leaderboard")
    sw.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a knob and its values (repeatable)")
    sw.add_argument("--grid-file", metavar="FILE", help="YAML: KEY: [V1, V2] per knob (values may contain commas)")
    sw.add_argument("--ranks", default="1", help="rank counts, e.g. 1,2,4: one job array each (default 1)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting for every point")
    sw.add_argument("--repeats", type=int, default=1, help="runs of each point (the leaderboard shows the median)")
    sw.add_argument("--sbatch-args", default="", help="more sbatch options, e.g. \"--partition=gpu --time=02:00:00\"")
    sw.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (%%K; default: all)")
    sw.add_argument("--target", help="the leaderboard's quality target, METRIC>=X or METRIC<=X (default: the "
                                     "config's mlperf.target, else val_accuracy>=0.9)")
    sw.add_argument("--local", action="store_true", help="run the points here in turn under mpirun, not as jobs")
    sw.add_argument("--retry-failed", action="store_true", help="run failed points again (default: leave them)")
    sw.add_argument("--status", metavar="DIR", help="say what is pending, queued, running, finished and failed")
    sw.set_defaults(func=cmd_sweep)

    dr = verbs.add_parser("doctor", help="pre-flight checks on every rank, under the same launcher and arguments as "
                                         "train: versions, dataset, run directory, network, GPUs, allreduce")
    dr.add_argument("--config", help="YAML config, as for train")
    dr.add_argument("--run-dir", help="the run directory train will use: writable, with room for checkpoints")
    dr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, as for train")
    dr.add_argument("--system-json", metavar="FILE", help="also write MLCommons' system description of these "
                                                          "machines here (python -m mlperf_logging.system_desc_checker)")
    dr.set_defaults(func=cmd_doctor)

    pm = verbs.add_parser("postmortem", help="what stopped a run: which rank stopped first, on which host, in "
                                             "which phase and step, what the others waited for, the first exception")
    pm.add_argument("run_dir", metavar="RUN_DIR")
    pm.add_argument("--json", action="store_true", help="one JSON object on stdout (keys: docs/troubleshooting.md)")
    pm.set_defaults(func=cmd_postmortem)

    ex = verbs.add_parser("export", help="serve-ready exports of a finished run's model").add_subparsers(
        dest="export_verb", required=True, parser_class=_Parser)
    et = ex.add_parser("tflite", help="int8 TFLite (post-training quantization) with accuracy and latency")
    et.add_argument("run_dir")
    et.add_argument("--samples", type=int, default=2000, help="validation samples to compare on (2000)")
    et.set_defaults(func=cmd_export_tflite)

    c = verbs.add_parser("checkpoint", help="inspect checkpoints").add_subparsers(
        dest="ckpt_verb", required=True, parser_class=_Parser)
    d = c.add_parser("digest", help="step and sha256 of the newest complete checkpoint's variables")
    d.add_argument("run_dir")
    d.set_defaults(func=cmd_checkpoint_digest)
    ls = c.add_parser("list", help="complete checkpoints, oldest first")
    ls.add_argument("run_dir")
    ls.set_defaults(func=cmd_checkpoint_list)
    pr = verbs.add_parser("predict", help="communication, step time and scaling efficiency at 2-512 ranks "
                                          "(docs/multinode.md)")
    pr.add_argument("--gradient-bytes", type=int, required=True, help="per step (a run's config.json: gradient_bytes)")
    pr.add_argument("--compute-ms", type=float, required=True, help="step time of one rank without communication")
    pr.add_argument("--link-gbps", type=float, help="per-host link rate (default: the --comm file's)")
    pr.add_argument("--ranks-per-host", type=int, default=1)
    pr.add_argument("--comm", metavar="FILE", help="alpha, latency, efficiency from pipeline bench comm")
    pr.add_argument("--alpha-ms", type=float, help="fixed cost per step (overrides --comm)")
    pr.add_argument("--latency-us", type=float, help="per message per ring step (overrides --comm)")
    pr.add_argument("--efficiency", type=float, help="share of the link rate reached (overrides --comm)")
    pr.add_argument("--host-gbps", type=float, help="what the hosts sustain while training (raw TCP between two "
                                                    "of them under load, pipeline bench multinode): the bandwidth "
                                                    "term uses min(link x efficiency, this)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)
    sl = verbs.add_parser("slurm", help="helpers for slurm/*.sbatch").add_subparsers(
        dest="slurm_verb", required=True, parser_class=_Parser)
    sc = sl.add_parser("command", help="print the launcher command for this allocation, NUL-separated")
    sc.add_argument("--launcher", default="mpirun", choices=["mpirun", "srun"])
    sc.add_argument("--ntasks", type=int, default=0, help="use the first N tasks only (default: all)")
    sc.add_argument("--hostfile", help="hosts and slots from this OpenMPI hostfile instead of SLURM's variables")
    sc.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    sc.set_defaults(func=cmd_slurm_command)

    b = verbs.add_parser("bench", help="benchmarks measured against baselines in the same run").add_subparsers(
        dest="bench_verb", required=True, parser_class=_Parser)
    bd = b.add_parser("data", help="reader vs raw h5py read vs training consumption, per rank")
    bd.add_argument("dir", nargs="?", help="a dataset directory (shards or indexed)")
    bd.add_argument("--layouts", action="store_true", help="one row per layout (shards, many per file, gzip "
                                                           "chunks, one sample per file, sub-volumes) on data made here")
    bd.add_argument("--work", help="with --layouts: where the generated data goes (default: a temporary directory)")
    bd.add_argument("--batch-size", type=int, default=64)
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--read-block", type=int, default=4096)
    bd.add_argument("--shuffle-buffer", type=int, default=65536)
    bd.add_argument("--threads", type=int, default=0)
    bd.add_argument("--json", help="also write the results here")
    bd.set_defaults(func=cmd_bench_data)
    bc = b.add_parser("convert", help="convert a generated multi-GiB CIFAR-10 source; report peak memory")
    bc.add_argument("--gib", type=float, default=4.0, help="source size in GiB (default 4)")
    bc.add_argument("--work", help="directory for the source and shards (default: a temporary one)")
    bc.add_argument("--keep", action="store_true", help="keep the generated files")
    bc.set_defaults(func=cmd_bench_convert)
    bl = b.add_parser("layout", help="shard size and read rate for chunk lengths x compressions")
    bl.add_argument("--samples", type=int, default=100000)
    bl.add_argument("--repeats", type=int, default=3)
    bl.add_argument("--work", help="directory for the trial datasets (default: a temporary one)")
    bl.set_defaults(func=cmd_bench_layout)
    br = b.add_parser("run", help="make bench: scaling, pipeline vs Keras and the Horovod loop, allreduce vs MPI")
    br.add_argument("--out", default="runs/bench")
    br.add_argument("--quick", action="store_true", help="one repeat, fewer steps (make bench BENCH=quick)")
    br.add_argument("--ranks", help="rank counts, e.g. 1,2,4 (default: 1, 2 and the core count up to 8)")
    br.add_argument("--repeats", type=int, help="default 5 (quick: 2)")
    br.add_argument("--steps", type=int, help="steps per run (default 300; quick: 100)")
    br.add_argument("--batch-size", type=int, default=64, help="per rank (default 64)")
    br.set_defaults(func=cmd_bench_run)
    bk = b.add_parser("knobs", help="one run per tuning knob (precision, XLA, compression, accumulation, ...) "
                                    "against the default: samples/s and accuracy")
    bk.add_argument("--out", default="runs/knobs")
    bk.add_argument("--ranks", type=int, default=2)
    bk.add_argument("--epochs", type=int, default=2)
    bk.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    bk.set_defaults(func=cmd_bench_knobs)
    bm = b.add_parser("comm", help="alpha, latency and link efficiency of the communication model (under mpirun)")
    bm.add_argument("--bytes", type=int, default=1 << 20, help="gradient bytes per step (config.json: gradient_bytes)")
    bm.add_argument("--link-gbps", type=float, help="the link's nominal rate, for the efficiency")
    bm.add_argument("--repeats", type=int, default=5)
    bm.add_argument("--out", help="write the figures here (JSON, for pipeline analyze/predict --comm)")
    bm.set_defaults(func=cmd_bench_comm)
    bv = b.add_parser("multinode", help="the communication model against training on shaped links between "
                                        "simulated hosts (root)")
    bv.add_argument("--out", default="runs/multinode")
    bv.add_argument("--rates", default="100mbit,1gbit", help="links to validate on (default 100mbit,1gbit)")
    bv.add_argument("--calibrate", default="400mbit", help="link the efficiency is measured on (default 400mbit)")
    bv.add_argument("--steps", type=int, default=120)
    bv.add_argument("--data", help="dataset (default: a small synthetic one made under --out)")
    bv.set_defaults(func=cmd_bench_multinode)
    bt = b.add_parser("ttt", help="time to train over seeded runs (mlperf.log), scored as MLPerf HPC does: fastest "
                                  "and slowest dropped, mean of the rest")
    bt.add_argument("--config", required=True, help="a config with the mlperf section on (configs/cosmoflow.yaml)")
    bt.add_argument("--runs", type=int, default=10, help="seeded runs (default 10, as MLPerf HPC asks for CosmoFlow)")
    bt.add_argument("--ranks", type=int, default=2, help="ranks per run, under mpirun (default 2)")
    bt.add_argument("--time-limit", type=float, default=1800.0, help="seconds per run; past it the run counts as not "
                                                                     "converged (default 1800)")
    bt.add_argument("--out", default="runs/ttt", help="one run directory per seed here, and ttt.json")
    bt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every run")
    bt.set_defaults(func=cmd_bench_ttt)
    ba = b.add_parser("analyze", help="time and peak memory of pipeline analyze on a million step records")
    ba.add_argument("--ranks", type=int, default=8)
    ba.add_argument("--steps", type=int, default=125_000)
    ba.add_argument("--work", help="directory for the generated run (default: a temporary one)")
    ba.set_defaults(func=cmd_bench_analyze)
    return p


class _TargetDefault(str):
    """analyze --target's default, told apart from the same value given on purpose."""


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's start-up chatter hides the progress lines; users can turn it back on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if hasattr(args, "target"):
        args.target_given = not isinstance(args.target, _TargetDefault)
    try:
        return args.func(args)
    except UserError as e:
        if not e.quiet:
            print(f"pipeline: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        from pipeline.train.checkpoint import CheckpointWriteError

        if not isinstance(e, CheckpointWriteError):
            raise
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

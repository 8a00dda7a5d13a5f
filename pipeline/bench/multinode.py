"""`pipeline bench multinode` (root): the communication model (pipeline/analysis/commmodel.py) checked
against real training between two simulated hosts (slurm/local/hosts-up.sh) on links shaped
to known rates (slurm/local/hosts-shape.sh).

1. compute: one rank on one host, no communication: the step time the model adds to.
2. host rate: raw TCP payload from one host to the other on the unshaped link, idle and
   while each host trains (a 1-rank run on each, its cores busy as in training): what the
   hosts' own network path sustains under load, the model's host term (H); with the share
   of CPU time the kernel spent in softirq (network processing) meanwhile.
3. alpha and latency: `pipeline bench comm` on the unshaped link.
4. efficiency: `pipeline bench comm` on a calibration link (400 Mbit/s by default), which is
   neither of the links validated on.
5. each validation link: 2 hosts x 1 rank train with a Horovod timeline; `pipeline analyze
   --comm` puts the prediction next to the measured allreduce time and step time, with the
   timeline's phases per step and the softirq share of CPU time during the run.
No figure is calibrated at a rate it is validated at: H and alpha are measured unshaped.
Every launch goes through the cluster path (`pipeline slurm command --hostfile`). The hosts
are removed afterwards whatever happens; results in OUT/multinode.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "slurm" / "local"
TOLERANCE = 0.25


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def gbps(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg])bit", rate.strip().lower())
    if not m:
        raise UserError(f"link rate {rate!r}: expected e.g. 100mbit or 1gbit")
    return float(m.group(1)) * {"k": 1e-6, "m": 1e-3, "g": 1.0}[m.group(2)]


def _sh(args: list[str], env: dict | None = None, log: Path | None = None) -> str:
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if log:
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:6]))}... exit {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
    return r.stdout


def cpu_times() -> list[int]:
    """This machine's CPU time so far, in jiffies (/proc/stat's first line): user, nice,
    system, idle, iowait, irq, softirq, steal. The simulated hosts share these cores."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def softirq_share(before: list[int], after: list[int]) -> float | None:
    d = [b - a for a, b in zip(before, after)]
    return d[6] / sum(d) if sum(d) > 0 else None


def host_rate(agent: Path, hosts: list[tuple[str, str]], out_dir: Path, env: dict, seconds: float = 2.0,
              tag: str = "") -> float:
    """Raw TCP payload rate (Gbit/s) from the first host to the second (pipeline.bench.tcprate)."""
    (h1, _), (h2, ip2) = hosts[0], hosts[1]
    port = 20000 + os.getpid() % 20000
    result = out_dir / f"tcprate{tag}.json"
    result.unlink(missing_ok=True)
    py = sys.executable
    recv = subprocess.Popen([str(agent), h2, py, "-m", "pipeline.bench.tcprate", "recv", str(port), str(result)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _sh([str(agent), h1, py, "-m", "pipeline.bench.tcprate", "send", ip2, str(port), str(seconds)], env=env)
        recv.wait(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
    r = json.loads(result.read_text())
    if not r.get("gbps"):
        raise RuntimeError(f"tcprate measured nothing: {r}")
    return r["gbps"]


class Load:
    """A 1-rank training on each simulated host, running until stopped: the hosts' cores busy
    as in training, with no network traffic of its own."""

    def __init__(self, agent: Path, hosts: list[tuple[str, str]], out_dir: Path, data, env: dict):
        self.procs, self.dirs = [], []
        for name, _ in hosts:
            d = out_dir / f"load-{name}"
            shutil.rmtree(d, ignore_errors=True)
            self.dirs.append(d)
            self.procs.append(subprocess.Popen(
                [str(agent), name, str(Path(sys.executable).parent / "pipeline"), "train", "--run-dir", str(d),
                 "--set", f"data.dir={data}", "--set", "train.max_steps=1000000", "--set", "checkpoint.every_steps=0",
                 "--set", "log.progress_every_s=3600", "--set", "data.cache_mb=4096", "--set", "train.epochs=1000"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def wait_busy(self, steps: int = 100, timeout: float = 300.0) -> None:
        """Until every host's run is past start-up (it has logged `steps` steps)."""
        deadline = time.monotonic() + timeout
        for p, d in zip(self.procs, self.dirs):
            log = d / "steps" / "rank-0.jsonl"
            while not (log.exists() and log.read_text().count("\n") > steps):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the load on {d.name} did not start (exit {p.poll()})")
                time.sleep(0.1)  # polling its step log, an observable condition

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


class _Hosts:
    """The simulated hosts of one bench run: launches through `pipeline slurm command
    --hostfile` (the multi-host path), shapes their link, trains and measures on them."""

    def __init__(self, out_dir: Path, data, steps: int):
        bindir = Path(sys.executable).parent
        self.out_dir, self.data, self.steps = out_dir, data, steps
        self.pipeline = str(bindir / "pipeline")
        self.env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2")
        self.dir = out_dir / "hosts"

    def up(self) -> None:
        _sh(["bash", str(LOCAL / "hosts-up.sh"), str(self.dir), "2", "1"])
        self.env.update(line.removeprefix("export ").split("=", 1)
                        for line in (self.dir / "env").read_text().splitlines())
        self.agent = self.dir / "agent"
        self.names = [tuple(line.split()[:2]) for line in (self.dir / "hosts").read_text().splitlines()]

    def down(self) -> None:
        subprocess.run(["bash", str(LOCAL / "hosts-shape.sh"), str(self.dir), "none"], capture_output=True)
        subprocess.run(["bash", str(LOCAL / "hosts-down.sh"), str(self.dir)], capture_output=True)

    def launch(self, ntasks: int, program: list[str], log: Path) -> str:
        cmd = _sh([self.pipeline, "slurm", "command", "--hostfile", str(self.dir / "hostfile"), "--ntasks",
                   str(ntasks), "--", *program], env=self.env).split("\0")[:-1]
        return _sh(cmd, env=self.env, log=log)

    def shape(self, rate: str) -> None:
        _sh(["bash", str(LOCAL / "hosts-shape.sh"), str(self.dir), rate])

    def train(self, name: str, ntasks: int) -> Path:
        run_dir = self.out_dir / name
        shutil.rmtree(run_dir, ignore_errors=True)
        self.launch(ntasks, [self.pipeline, "train", "--run-dir", str(run_dir), "--set", f"data.dir={self.data}",
                             "--set", f"train.max_steps={self.steps}", "--set", "checkpoint.every_steps=0",
                             "--set", "log.timeline=true", "--set", "data.cache_mb=4096"],
                    self.out_dir / f"{name}.log")
        return run_dir

    def comm(self, grad: int, rate: str | None) -> dict:
        f = self.out_dir / f"comm-{rate or 'unshaped'}.json"
        self.launch(2, [self.pipeline, "bench", "comm", "--bytes", str(grad), "--out", str(f)]
                    + (["--link-gbps", str(gbps(rate))] if rate else []),
                    self.out_dir / f"comm-{rate or 'unshaped'}.log")
        return json.loads(f.read_text())

    def host_rates(self) -> dict:
        """Raw TCP between the hosts, unshaped: idle, then while both train."""
        idle = host_rate(self.agent, self.names, self.out_dir, self.env, tag="-idle")
        load = Load(self.agent, self.names, self.out_dir, self.data, self.env)
        try:
            load.wait_busy()
            t0 = cpu_times()
            loaded = host_rate(self.agent, self.names, self.out_dir, self.env, tag="-loaded")
            softirq = softirq_share(t0, cpu_times())
        finally:
            load.stop()
        return {"idle_gbps": idle, "loaded_gbps": loaded, "softirq_share_loaded": softirq}


def run(out: str, rates: list[str], calibrate: str, steps: int, data: str | None) -> dict:
    """The model calibrated on the simulated hosts, then checked against training on each link
    rate; met/MISSED is a figure of the result (`met`), not the exit status."""
    if os.geteuid() != 0:
        raise UserError("bench multinode needs root (network namespaces for the simulated hosts)")
    for r in rates + [calibrate]:
        gbps(r)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not data:
        from pipeline.data.synth import synth

        data = out_dir / "data"
        if not (data / "manifest.json").exists():
            synth(data, samples_train=20000, samples_val=1000, shards=2, seed=1, progress=lambda *_: None)
    hosts = _Hosts(out_dir, data, steps)
    hosts.up()
    try:
        res = _measure(hosts, out_dir, rates, calibrate)
    finally:
        hosts.down()
    (out_dir / "multinode.json").write_text(json.dumps(res, indent=1))
    _print_result(res, calibrate, out_dir)
    return res


def _measure(hosts: _Hosts, out_dir: Path, rates: list[str], calibrate: str) -> dict:
    from pipeline.analysis import report

    print("bench multinode: compute (1 rank on one host)", flush=True)
    compute_run = hosts.train("compute", 1)
    grad = json.loads(RunDir(compute_run).config.read_text())["gradient_bytes"]
    compute_s = report.analyze([str(compute_run)])["runs"][0]["step_s"]["p50"]
    hosts.shape("none")
    print("bench multinode: host rate (raw TCP between the hosts, unshaped: idle, then while both train)",
          flush=True)
    host = hosts.host_rates()
    print("bench multinode: alpha and latency (unshaped link)", flush=True)
    fixed = hosts.comm(grad, None)
    hosts.shape(calibrate)
    print(f"bench multinode: efficiency ({calibrate} link)", flush=True)
    cal = hosts.comm(grad, calibrate)
    calibration = {"alpha_s": fixed["alpha_s"], "latency_s": fixed["latency_s"],
                   "efficiency": cal["efficiency"], "calibrated_on": calibrate,
                   "host_gbps": host["loaded_gbps"],
                   "host_measured": "raw TCP between the hosts, unshaped, while both train"}
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=1))
    rows = []
    for rate in rates:
        hosts.shape(rate)
        print(f"bench multinode: training, 2 hosts x 1 rank, {rate} link", flush=True)
        t0 = cpu_times()
        run_dir = hosts.train(f"train-{rate}", 2)
        irq = softirq_share(t0, cpu_times())
        s = report.analyze([str(run_dir)], link_gbps=gbps(rate), comm_file=str(out_dir / "calibration.json"),
                           compute_ms=compute_s * 1e3)["runs"][0]
        rows.append(_row(rate, run_dir, s, grad, irq))
    met = all(r["comm_ratio"] is not None and abs(r["comm_ratio"] - 1) <= TOLERANCE for r in rows)
    return {"gradient_bytes": grad, "compute_s": compute_s, "calibration": calibration, "host": host, "rows": rows,
            "tolerance": TOLERANCE, "met": met}


def _row(rate: str, run_dir: Path, s: dict, grad: int, irq: float) -> dict:
    m = s["comm_model"]
    return {"link": rate, "link_gbps": gbps(rate), "run_dir": str(run_dir),
            "predicted_comm_s": m["predicted_comm_s"], "measured_comm_s": m["measured_comm_s"],
            "comm_ratio": m["comm_ratio"], "predicted_step_s": m["predicted_step_s"],
            "measured_step_s": m["measured_step_s"], "step_ratio": m["step_ratio"],
            "ring_only_s": grad * 8 / (gbps(rate) * 1e9), "softirq_share": irq,
            "host_bound": m["network"]["host_gbps"] is not None
            and m["network"]["host_gbps"] < gbps(rate) * m["network"]["efficiency"],
            "phases_ms_per_step": {k: v["per_step_s"] * 1e3
                                   for k, v in (s["communication"].get("phases") or {}).items()}}


def _print_result(res: dict, calibrate: str, out_dir: Path) -> None:
    cal, host, rows = res["calibration"], res["host"], res["rows"]
    print(f"gradient {res['gradient_bytes']:,} B/step; compute {res['compute_s'] * 1e3:.2f} ms/step; alpha "
          f"{cal['alpha_s'] * 1e3:.3f} ms, latency {cal['latency_s'] * 1e6:.1f} us (unshaped); efficiency "
          f"{cal['efficiency']:.3f} ({calibrate})")
    print(f"host rate (raw TCP, unshaped): idle {host['idle_gbps']:.2f} Gbit/s, while both hosts train "
          f"{host['loaded_gbps']:.2f} Gbit/s (softirq {_pct(host['softirq_share_loaded'])} of CPU time): the "
          f"model's H; it bounds a link of B when H < B x efficiency")
    print("link       ring S/B ms  predicted ms  measured ms  pred/meas  step pred ms  step meas ms  pred/meas")
    for r in rows:
        print(f"{r['link']:<9}  {r['ring_only_s'] * 1e3:>11.2f}  {r['predicted_comm_s'] * 1e3:>12.2f}  "
              f"{(r['measured_comm_s'] or 0) * 1e3:>11.2f}  {r['comm_ratio'] or 0:>9.2f}  "
              f"{r['predicted_step_s'] * 1e3:>12.2f}  {r['measured_step_s'] * 1e3:>12.2f}  {r['step_ratio']:>9.2f}"
              f"  {'host-bound' if r['host_bound'] else 'link-bound'}, softirq {_pct(r['softirq_share'])}")
    for r in rows:
        print(f"  {r['link']} timeline per step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                                             sorted(r["phases_ms_per_step"].items())))
    print(f"communication within {TOLERANCE:.0%} of the model at every link: {'met' if res['met'] else 'MISSED'}"
          f" ({out_dir / 'multinode.json'})")


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/multinode")
    p.add_argument("--rates", default="100mbit,1gbit", help="links to validate on (default 100mbit,1gbit)")
    p.add_argument("--calibrate", default="400mbit", help="link the efficiency is measured on (default 400mbit)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--data", help="dataset (default: a small synthetic one made under --out)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    run(a.out, [r for r in a.rates.split(",") if r], a.calibrate, a.steps, a.data)
    return 0  # it measured: met or MISSED is in its table and its JSON

"""Communication model: how long the gradient allreduce of one step takes on a given network,
and what that does to step time and scaling efficiency, from figures a user can measure.

Ring allreduce over N ranks: every rank sends and receives 2(N-1)/N x S bytes in 2(N-1)
steps (reduce-scatter, then allgather). With ranks placed host by host, each host's link
carries one ring hop, so the per-link volume is the same 2(N-1)/N x S whatever the ranks per
host. One step's communication is then

    t_comm(N) = alpha + 2(N-1) x latency + 2(N-1)/N x S / (B x efficiency)

- S: gradient bytes per step (trainable parameters x bytes per element sent; fp16
  compression halves it), from the run's config.json or the model.
- B: the link's nominal bandwidth per host.
- alpha: the fixed cost Horovod adds to every step (its cycle, negotiation, the fusion-buffer
  copies and MPI's start), measured with a small allreduce (`pipeline bench comm`).
- latency: per message and ring step on the network (a few microseconds on InfiniBand, tens
  on TCP Ethernet).
- efficiency: the share of B that allreduce messages of S bytes reach on this MPI stack
  (headers, acknowledgements, and whether both directions of a link are used at once),
  measured once on a link of known rate with `pipeline bench comm --link-gbps`.
- host rate H (optional): what the hosts themselves sustain, the TCP payload rate between
  two of them while they train (the kernel's TCP/IP path runs on the cores that compute).
  The bandwidth term uses min(B x efficiency, H): where the hosts move bytes slower than the
  link, they bound the transfer, not the link. Measured unshaped under load by `pipeline
  bench multinode`; RDMA NICs (InfiniBand, RoCE) move bytes without the host's cores, so on
  such clusters H is far above B and the term is inactive.
With no network between the ranks (one host) the bandwidth and latency terms are left out.

Step time, weak scaling (fixed per-rank batch), communication not overlapped with compute
(Horovod overlaps part of it with backpropagation; the model's step time is an upper bound):

    t_step(N) = t_compute + t_comm(N),  efficiency(N) = t_compute / t_step(N)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import UserError

RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class Network:
    link_gbps: float
    alpha_s: float = 0.0
    latency_s: float = 0.0
    efficiency: float = 1.0
    host_gbps: float | None = None  # what the hosts sustain under load (None: not bounded)

    def __post_init__(self):
        if not self.link_gbps > 0:
            raise UserError(f"link bandwidth must be > 0 Gbit/s, got {self.link_gbps}")
        if not 0 < self.efficiency <= 1.5:
            raise UserError(f"link efficiency must be in (0, 1.5], got {self.efficiency}")
        if self.alpha_s < 0 or self.latency_s < 0:
            raise UserError("alpha and latency must be >= 0")
        if self.host_gbps is not None and not self.host_gbps > 0:
            raise UserError(f"host rate must be > 0 Gbit/s, got {self.host_gbps}")

    @property
    def rate_gbps(self) -> float:
        """The rate the bandwidth term uses: the link's reach, or the hosts' where lower."""
        reach = self.link_gbps * self.efficiency
        return min(reach, self.host_gbps) if self.host_gbps else reach

    @property
    def host_bound(self) -> bool:
        return bool(self.host_gbps) and self.host_gbps < self.link_gbps * self.efficiency


def ring_bytes(grad_bytes: int, ranks: int) -> float:
    """Bytes each rank (and each host link) sends per allreduce of grad_bytes over a ring."""
    return 2 * (ranks - 1) / ranks * grad_bytes if ranks > 1 else 0.0


def comm_s(grad_bytes: int, ranks: int, ranks_per_host: int, net: Network) -> dict:
    """Predicted allreduce time per step and its terms (seconds)."""
    if ranks < 1 or ranks_per_host < 1:
        raise UserError(f"ranks and ranks per host must be >= 1, got {ranks} and {ranks_per_host}")
    hosts = math.ceil(ranks / ranks_per_host)
    if ranks == 1:
        return {"hosts": 1, "alpha_s": 0.0, "latency_s": 0.0, "bandwidth_s": 0.0, "total_s": 0.0}
    bw = ring_bytes(grad_bytes, ranks) * 8 / (net.rate_gbps * 1e9) if hosts > 1 else 0.0
    lat = 2 * (ranks - 1) * net.latency_s if hosts > 1 else 0.0
    return {"hosts": hosts, "alpha_s": net.alpha_s, "latency_s": lat, "bandwidth_s": bw,
            "total_s": net.alpha_s + lat + bw}


def projection(grad_bytes: int, compute_s: float, ranks_per_host: int, net: Network,
               ranks: tuple[int, ...] = RANKS) -> list[dict]:
    """Step time and weak-scaling efficiency at each rank count."""
    rows = []
    for n in ranks:
        c = comm_s(grad_bytes, n, ranks_per_host, net)
        step = compute_s + c["total_s"]
        rows.append({"ranks": n, "hosts": c["hosts"], "comm_s": c["total_s"], "bandwidth_s": c["bandwidth_s"],
                     "step_s": step, "efficiency": compute_s / step if step else None})
    return rows


def network_from(link_gbps: float, calibration: dict | None = None, **overrides) -> Network:
    """A Network for a link of link_gbps with alpha/latency/efficiency from a `pipeline bench
    comm` result when given; explicit overrides win."""
    kw = {}
    if calibration:
        kw = {k: calibration[k] for k in ("alpha_s", "latency_s", "efficiency", "host_gbps")
              if calibration.get(k) is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Network(link_gbps=link_gbps, **kw)


def load_network(link_gbps: float | None, comm_file: str | None, **overrides) -> Network:
    """The network of `--link-gbps` / `--comm FILE` (a `pipeline bench comm` result) and
    explicit overrides, as `pipeline analyze` and `pipeline predict` take them."""
    cal = None
    if comm_file:
        try:
            cal = json.loads(Path(comm_file).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--comm {comm_file}: cannot read a pipeline bench comm result ({e})") from None
        if not isinstance(cal, dict) or "alpha_s" not in cal:
            raise UserError(f"--comm {comm_file}: not a pipeline bench comm result (no alpha_s)")
    if link_gbps is None:
        link_gbps = (cal or {}).get("link_gbps")
        if not link_gbps:
            raise UserError(f"--comm {comm_file}: it names no link rate; give --link-gbps" if comm_file
                            else "give --link-gbps (the per-host link rate) or --comm FILE")
    return network_from(link_gbps, cal, **overrides)


def table_lines(rows: list[dict], title: str) -> list[str]:
    out = [title, "ranks  hosts  comm ms  (bandwidth ms)  step ms  efficiency"]
    out += [f"{r['ranks']:>5}  {r['hosts']:>5}  {r['comm_s'] * 1e3:>7.2f}  {r['bandwidth_s'] * 1e3:>14.2f}  "
            f"{r['step_s'] * 1e3:>7.2f}  {r['efficiency']:>10.3f}" for r in rows]
    return out


def as_dict(net: Network) -> dict:
    return asdict(net)


# --- the command line (pipeline/cli.py dispatches) ---

def predict_arguments(p) -> None:
    p.add_argument("--gradient-bytes", type=int, required=True, help="per step (a run's config.json: gradient_bytes)")
    p.add_argument("--compute-ms", type=float, required=True, help="step time of one rank without communication")
    p.add_argument("--link-gbps", type=float, help="per-host link rate (default: the --comm file's)")
    p.add_argument("--ranks-per-host", type=int, default=1)
    p.add_argument("--comm", metavar="FILE", help="alpha, latency, efficiency from pipeline bench comm")
    p.add_argument("--alpha-ms", type=float, help="fixed cost per step (overrides --comm)")
    p.add_argument("--latency-us", type=float, help="per message per ring step (overrides --comm)")
    p.add_argument("--efficiency", type=float, help="share of the link rate reached (overrides --comm)")
    p.add_argument("--host-gbps", type=float, help="what the hosts sustain while training (raw TCP between two "
                                                   "of them under load, pipeline bench multinode): the bandwidth "
                                                   "term uses min(link x efficiency, this)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=predict_cli)


def predict_cli(a) -> int:
    from pipeline.emit import emit

    net = load_network(a.link_gbps, a.comm, alpha_s=a.alpha_ms / 1e3 if a.alpha_ms is not None else None,
                       latency_s=a.latency_us / 1e6 if a.latency_us is not None else None, efficiency=a.efficiency,
                       host_gbps=a.host_gbps)
    rows = projection(a.gradient_bytes, a.compute_ms / 1e3, a.ranks_per_host, net)
    result = {"network": as_dict(net), "gradient_bytes": a.gradient_bytes, "compute_s": a.compute_ms / 1e3,
              "ranks_per_host": a.ranks_per_host, "rows": rows}
    host = ""
    if net.host_gbps:
        host = f", host rate {net.host_gbps:g} Gbit/s" + (" (bounds the transfer)" if net.host_bound else "")
    title = (f"{a.gradient_bytes:,} gradient bytes/step, compute {a.compute_ms:g} ms/step, {a.ranks_per_host} "
             f"ranks/host, {net.link_gbps:g} Gbit/s x {net.efficiency:.3f}, alpha {net.alpha_s * 1e3:.3f} ms, "
             f"latency {net.latency_s * 1e6:.1f} us{host}")
    return emit(result, a.json, lambda r: "\n".join(table_lines(r["rows"], title)) + "\n")

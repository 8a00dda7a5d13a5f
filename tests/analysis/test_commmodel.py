"""The communication model (pipeline/analysis/commmodel.py) against hand calculations, `pipeline
predict`, and the gradient-only split of a Horovod timeline it is compared with."""

from __future__ import annotations

import json

import pytest
from conftest import pipeline

from pipeline.analysis import commmodel, timeline
from pipeline.errors import UserError


def test_ring_volume_per_link():
    assert commmodel.ring_bytes(1000, 1) == 0
    assert commmodel.ring_bytes(1000, 2) == pytest.approx(1000)
    assert commmodel.ring_bytes(1000, 4) == pytest.approx(1500)
    assert commmodel.ring_bytes(1000, 512) == pytest.approx(2 * 511 / 512 * 1000)


def test_comm_time_matches_a_hand_calculation():
    net = commmodel.Network(link_gbps=1.0, alpha_s=1e-3, latency_s=10e-6, efficiency=0.5)
    c = commmodel.comm_s(1_000_000, 4, 2, net)
    # 2 hosts: 1.5 MB over each link at 0.5 x 1 Gbit/s = 24 ms; 6 ring steps x 10 us.
    assert c["hosts"] == 2
    assert c["bandwidth_s"] == pytest.approx(0.024)
    assert c["latency_s"] == pytest.approx(60e-6)
    assert c["total_s"] == pytest.approx(0.001 + 0.024 + 60e-6)
    # All ranks on one host: no network term, only Horovod's fixed cost.
    one = commmodel.comm_s(1_000_000, 4, 4, net)
    assert one["hosts"] == 1 and one["total_s"] == pytest.approx(0.001)


def test_projection_efficiency_falls_with_ranks_and_faster_links_help():
    slow = commmodel.projection(373_288, 0.016, 4, commmodel.Network(25, alpha_s=1e-3, latency_s=5e-6))
    fast = commmodel.projection(373_288, 0.016, 4, commmodel.Network(100, alpha_s=1e-3, latency_s=5e-6))
    assert [r["ranks"] for r in slow] == list(commmodel.RANKS)
    effs = [r["efficiency"] for r in slow]
    assert effs == sorted(effs, reverse=True)
    assert all(f["efficiency"] >= s["efficiency"] for s, f in zip(slow, fast))
    last = slow[-1]
    expect = 0.016 / (0.016 + 1e-3 + 2 * 511 * 5e-6 + 2 * 511 / 512 * 373_288 * 8 / 25e9)
    assert last["efficiency"] == pytest.approx(expect)


def test_hosts_slower_than_the_link_bound_the_transfer():
    link = commmodel.Network(link_gbps=10.0, alpha_s=1e-3, efficiency=0.8)
    slow_hosts = commmodel.Network(link_gbps=10.0, alpha_s=1e-3, efficiency=0.8, host_gbps=2.0)
    fast_hosts = commmodel.Network(link_gbps=10.0, alpha_s=1e-3, efficiency=0.8, host_gbps=50.0)
    # 1 MB per link: 1 ms at 8 Gbit/s (10 x 0.8); 4 ms when the hosts move 2 Gbit/s.
    assert commmodel.comm_s(1_000_000, 2, 1, link)["bandwidth_s"] == pytest.approx(1e-3)
    assert commmodel.comm_s(1_000_000, 2, 1, slow_hosts)["bandwidth_s"] == pytest.approx(4e-3)
    assert commmodel.comm_s(1_000_000, 2, 1, fast_hosts)["bandwidth_s"] == pytest.approx(1e-3)
    assert slow_hosts.host_bound and not fast_hosts.host_bound and not link.host_bound
    # The same term from a bench's calibration file, and from pipeline predict --host-gbps.
    net = commmodel.network_from(10.0, {"alpha_s": 1e-3, "latency_s": 0, "efficiency": 0.8, "host_gbps": 2.0})
    assert net.rate_gbps == 2.0
    r = pipeline("predict", "--gradient-bytes", 1_000_000, "--compute-ms", 10, "--link-gbps", 10, "--alpha-ms", 1,
                 "--latency-us", 0, "--efficiency", 0.8, "--host-gbps", 2, "--json")
    assert r.returncode == 0, r.stderr
    row2 = json.loads(r.stdout)["rows"][0]
    assert row2["ranks"] == 2 and row2["bandwidth_s"] == pytest.approx(4e-3)
    with pytest.raises(UserError, match="host rate"):
        commmodel.Network(link_gbps=1, host_gbps=0)


def test_bad_network_figures_are_user_errors():
    with pytest.raises(UserError, match="link bandwidth"):
        commmodel.Network(link_gbps=0)
    with pytest.raises(UserError, match="efficiency"):
        commmodel.Network(link_gbps=1, efficiency=0)


def test_predict_command(tmp_path):
    r = pipeline("predict", "--gradient-bytes", 373288, "--compute-ms", 16, "--link-gbps", 25, "--ranks-per-host", 4,
                 "--alpha-ms", 1, "--latency-us", 5, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [row["ranks"] for row in out["rows"]] == list(commmodel.RANKS)
    assert out["network"] == {"link_gbps": 25.0, "alpha_s": 0.001, "latency_s": 5e-6, "efficiency": 1.0,
                              "host_gbps": None}
    # A bench comm result supplies alpha, latency, efficiency and the link; flags override it.
    cal = tmp_path / "comm.json"
    cal.write_text(json.dumps({"alpha_s": 0.002, "latency_s": 1e-5, "efficiency": 0.8, "link_gbps": 1.0}))
    r = pipeline("predict", "--gradient-bytes", 1000, "--compute-ms", 10, "--comm", cal, "--efficiency", 0.5)
    assert r.returncode == 0, r.stderr
    assert "1 Gbit/s x 0.500, alpha 2.000 ms" in r.stdout and r.stdout.count("\n") == 2 + len(commmodel.RANKS)
    for args, msg in ((["--link-gbps", 0], "link bandwidth"), ([], "give --link-gbps"),
                      (["--comm", tmp_path / "missing.json"], "missing.json")):
        r = pipeline("predict", "--gradient-bytes", 1000, "--compute-ms", 10, *args)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_timeline_separates_gradient_allreduces_and_counts_fused_operations(tmp_path):
    def tensor(pid, name):
        return [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]

    def op(pid, start, dur):
        return [{"ph": "B", "name": "ALLREDUCE", "ts": start, "pid": pid},
                {"ph": "B", "name": "MPI_ALLREDUCE", "ts": start, "pid": pid},
                {"ph": "E", "ts": start + dur, "pid": pid}, {"ph": "E", "ts": start + dur, "pid": pid}]

    evs = tensor(1, "stop_flag") + tensor(2, "DistributedGradientTape_Allreduce/cond/HorovodAllreduce_gradient_tape_"
                                                "cnn_dense_MatMul_0") + tensor(3, "grads_1")
    # Step 1: two gradient tensors fused in one 1 ms call, then the stop flag (3 ms of waiting).
    evs += op(2, 0, 1000) + op(3, 0, 1000) + op(1, 2000, 3000)
    # Step 2: the two gradients in separate calls of 1 ms each.
    evs += op(2, 10000, 1000) + op(3, 12000, 1000) + op(1, 14000, 3000)
    p = tmp_path / "timeline.json"
    p.write_text("[\n" + ",\n".join(json.dumps(e) for e in evs) + "\n]")
    res = timeline.analyze([p], 2)
    assert res["phases"]["MPI_ALLREDUCE"]["wall_s"] == pytest.approx(0.009)
    assert res["gradient_phases"]["MPI_ALLREDUCE"]["wall_s"] == pytest.approx(0.003)
    assert res["gradient_ops"] == 3


def test_timeline_counts_collectives_no_gradient_shares_and_the_exposed_tail(tmp_path):
    def tensor(pid, name):
        return [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]

    def life(pid, ready, start, dur):
        # negotiation: rank 0 ready at `ready`, rank 1 100 us later; then the call
        return [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": ready, "pid": pid},
                {"ph": "X", "name": "0", "ts": ready, "pid": pid, "dur": 0},
                {"ph": "X", "name": "1", "ts": ready + 100, "pid": pid, "dur": 0},
                {"ph": "E", "ts": ready + 100, "pid": pid},
                {"ph": "B", "name": "ALLREDUCE", "ts": start, "pid": pid},
                {"ph": "B", "name": "MPI_ALLREDUCE", "ts": start, "pid": pid},
                {"ph": "E", "ts": start + dur, "pid": pid}, {"ph": "E", "ts": start + dur, "pid": pid}]

    # The Horovod Keras loop's names (hvd.DistributedOptimizer) are gradients too.
    assert timeline.is_gradient("PartitionedCall/DistributedAdam_Allreduce/cond_9/then/_1/"
                                "DistributedAdam_Allreduce/cond_9/HorovodAllreduce_grads_9_0")
    assert timeline.is_gradient("while/body/_1/gradient_allreduce/HorovodAllreduce_gradient_tape_cnn_dense_1_0")
    assert not timeline.is_gradient("while/body/_1/while/StatefulPartitionedCall/stop_flag")
    evs = tensor(1, "f/stop_flag") + tensor(2, "f/gradient_allreduce/HorovodAllreduce_gradient_tape_b") + \
        tensor(3, "f/gradient_allreduce/HorovodAllreduce_gradient_tape_a")
    # Step 1: the stop flag alone at the step's start, then the two gradients fused; the last
    # one ready at 5,100 (both ranks), reduced by 6,000: a 0.9 ms tail.
    evs += life(1, 0, 200, 100) + life(2, 3000, 5200, 800) + life(3, 5000, 5200, 800)
    # Step 2: the stop flag fused with the first gradient's call; the second in its own call.
    evs += life(1, 10000, 10200, 100) + life(2, 10000, 10200, 100) + life(3, 12000, 12200, 1900)
    p = tmp_path / "timeline.json"
    p.write_text("[\n" + ",\n".join(json.dumps(e) for e in evs) + "\n]")
    res = timeline.analyze([p], 2)
    assert res["steps"] == 2 and res["gradient_ops"] == 3 and res["solo_ops"] == 1
    assert res["exposed_tail_p50_s"] == pytest.approx((0.0009 + 0.002) / 2)

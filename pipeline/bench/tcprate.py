"""Raw TCP payload rate between two hosts: what their network path (sockets, TCP/IP, the
NIC's driver, here veth and a bridge) sustains, without MPI or Horovod. `pipeline bench
multinode` runs it between the simulated hosts, idle and while they train.

    python -m pipeline.bench.tcprate recv PORT OUT.json    # on the receiving host: one stream
    python -m pipeline.bench.tcprate send HOST PORT SECONDS  # on the sending host
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 1 << 20


def recv(port: int, out: str) -> int:
    with socket.create_server(("0.0.0.0", port)) as srv:
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            total, t0, t_last = 0, None, None
            while True:
                n = conn.recv_into(view)
                if not n:
                    break
                now = time.perf_counter()
                t0 = t0 or now  # from the first bytes: connection set-up is not payload time
                total += n
                t_last = now
    secs = (t_last - t0) if t0 and t_last and t_last > t0 else 0.0
    with open(out, "w") as f:
        json.dump({"bytes": total, "seconds": secs, "gbps": total * 8 / secs / 1e9 if secs else None}, f)
    return 0


def send(host: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + 30
    while True:  # the receiver may not listen yet
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = b"\0" * CHUNK
    with conn:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.sendall(payload)
    return 0


if __name__ == "__main__":
    verb = sys.argv[1]
    if verb == "recv":
        raise SystemExit(recv(int(sys.argv[2]), sys.argv[3]))
    raise SystemExit(send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))

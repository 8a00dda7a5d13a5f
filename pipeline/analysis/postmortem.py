"""`pipeline postmortem RUN`: which rank stopped first, on which host, doing what.

It reads what every rank left (pipeline/runtime/flight.py): the flight recorder's ring
(`ranks/rank-R.events`, there however the rank ended), the post-mortem written when the
rank stalled, raised or was told to stop (`postmortem/rank-R.json`, stacks in `.txt`), and
the step log's last record. The rules, in order:

1. A rank that raised: the first exception by time is the cause (Horovod's shutdown makes
   its peers raise their own later).
2. A rank that never started its recorder, then ranks stuck outside any collective (reading
   data, evaluating, writing a checkpoint, starting up) while their peers wait in one, then
   ranks that stopped running while their peers went on (`stopped()`: the heartbeat in the
   ring's header ended, or the rank itself found it had not run, while a peer's went on), then
   ranks that left no post-mortem while others did (killed, exited, stopped): the one
   furthest behind (step, then phase) stopped first.
3. Otherwise every rank waited in the same collective: the hang is inside it (network, NCCL,
   a frozen process); the stacks are in postmortem/rank-R.txt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.rundir import RunDir, is_header
from pipeline.runtime import flight

_ENDED = ("done", "stop")


def _last_step_record(path: Path) -> dict | None:
    """The last step record of a step log, reading only its tail."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and not is_header(r) and "step" in r:
            return r
    return None


def _rank_state(rd: RunDir, rank: int, hosts: list) -> dict:
    ring = flight.read_events(flight.events_path(rd.path, rank))
    txt, js = flight.postmortem_paths(rd.path, rank)
    pm = None
    try:
        pm = json.loads(js.read_text())
    except (OSError, ValueError):
        pass
    header, events = ring if ring else ({}, [])
    if pm is not None and header and pm.get("pid") != header.get("pid"):
        pm = None  # left by another attempt of this run
    last = events[-1] if events else None
    waiting_on = ""
    if last and last["waiting"]:
        for e in reversed(events):
            if e["kind"] in ("wait", "call") and e["waiting"]:
                waiting_on = e["label"]
                break
    host = header.get("host") or (pm or {}).get("host") or (hosts[rank] if rank < len(hosts) else None)
    logged = _last_step_record(rd.step_log(rank))
    st = {"rank": rank, "host": host, "pid": header.get("pid") or (pm or {}).get("pid"),
          "phase": last["phase"] if last else (pm or {}).get("phase"),
          "step": last["step"] if last else (pm or {}).get("step"),
          "waiting": waiting_on or None,
          "last_event_time": last["time"] if last else None,
          "last_event": f"{last['kind']} {last['label']}".strip() if last else None,
          "left": "post-mortem" if pm else ("events" if ring else "nothing"),
          "postmortem": (pm.get("reason") or "").split("\n")[0] if pm else None,
          "exit_code": pm.get("exit_code") if pm else None,
          "last_logged_step": logged.get("step") if logged else None,
          "heartbeat": header.get("heartbeat"), "suspended_s": header.get("suspended_s"),
          "resumed": header.get("resumed"), "postmortem_time": pm.get("time") if pm else None,
          "stacks": str(txt) if txt.exists() and txt.stat().st_size else None}
    if pm and pm.get("exception"):
        st["exception"] = {**pm["exception"], "time": pm.get("time")}
    return st


def _behind(st: dict) -> tuple:
    """Sort key: least progress first (step, then phase), then the oldest last event."""
    phase = st["phase"] if st["phase"] in flight.PHASES else "startup"
    return (st["step"] or 0, flight.PHASES.index(phase), st["last_event_time"] or 0.0)


# A heartbeat this much older than a peer's end, or a gap this long in a rank's own running,
# is a rank that stopped running (the heartbeat ticks about once a second).
STOPPED_S = 3.0


def _end(st: dict) -> float:
    """When a rank was last seen running: its post-mortem or its last heartbeat."""
    return max(st.get("postmortem_time") or 0.0, st.get("heartbeat") or 0.0, st.get("last_event_time") or 0.0)


def _gap(st: dict) -> tuple[float, float] | None:
    """(from, to) wall clock of the time a rank found on waking that it had not run, if long."""
    if (st["suspended_s"] or 0) >= STOPPED_S and st["resumed"]:
        return st["resumed"] - st["suspended_s"], st["resumed"]
    return None


def stopped(ranks: list[dict]) -> list[tuple[dict, float, str]]:
    """(rank, when it stopped running, why) for each rank that stopped running while a peer
    went on: it found on waking that it had not run for STOPPED_S or more (`suspended_s`,
    `resumed` in its ring) from a time when a peer without such a gap was running, or its
    heartbeat ended STOPPED_S or more before a peer's end and it left no post-mortem (so its
    own watchdog did not end it). Every rank with the same gap: the whole job was suspended,
    not one rank."""
    out = []
    for r in ranks:
        peers = [p for p in ranks if p is not r and p["left"] != "nothing"]
        if r["left"] == "nothing" or not peers:
            continue
        gap = _gap(r)
        if gap:
            t0, t1 = gap
            running = [p for p in peers if not (_gap(p) and _gap(p)[0] < t1 and _gap(p)[1] > t0)]
            gave_up = max((_end(p) for p in running), default=0.0)
            if gave_up > t0 + STOPPED_S:
                out.append((r, t0, f"stopped running at {_when(t0)}, {gave_up - t0:.0f}s before its peers gave up, "
                                   f"and ran again at {_when(t1)}: stopped, frozen or starved, not waiting"))
                continue
        beat = r["heartbeat"]
        if beat and r["left"] == "events" and r["phase"] not in _ENDED:
            gave_up = max(_end(p) for p in peers)
            if gave_up - beat >= STOPPED_S:
                out.append((r, beat, f"stopped running at {_when(beat)}, {gave_up - beat:.0f}s before its peers gave "
                                     f"up, and left no post-mortem: stopped, frozen or killed, not waiting"))
    return out


def analyze(run_dir: str | Path) -> dict:
    """{"run_dir", "first", "ranks", "first_exception", "lines"} (docs/troubleshooting.md)."""
    rd = RunDir(run_dir)
    try:
        cfg = json.loads(rd.config.read_text())
    except (OSError, ValueError):
        cfg = {}
    hosts = cfg.get("hosts") or []
    found = {int(p.name.split("-")[1].split(".")[0]) for p in rd.ranks_dir.glob("rank-*.events")} \
        if rd.ranks_dir.is_dir() else set()
    found |= {int(p.stem.split("-")[1]) for p in (rd.path / flight.POSTMORTEM).glob("rank-*.json")} \
        if (rd.path / flight.POSTMORTEM).is_dir() else set()
    size = max([cfg.get("ranks") or 0] + [r + 1 for r in found])
    ranks = [_rank_state(rd, r, hosts) for r in range(size)]

    exceptions = sorted((r for r in ranks if r.get("exception")), key=lambda r: r["exception"]["time"] or 0)
    first_exc = None
    if exceptions:
        r = exceptions[0]
        first_exc = {"rank": r["rank"], "host": r["host"], **r["exception"]}

    first, reason = None, ""
    reported = [r for r in ranks if r["left"] == "post-mortem"]
    if exceptions:
        first = exceptions[0]
        e = first["exception"]
        reason = f"raised {e['type']}: {e['message'].splitlines()[0] if e['message'] else ''}"
    elif all(r["left"] != "nothing" and r["phase"] in _ENDED and not r["postmortem"] for r in ranks) and ranks:
        reason = "no rank stopped early: every rank finished or stopped as asked"
    else:
        never = [r for r in ranks if r["left"] == "nothing"]
        outside = [r for r in ranks if r["left"] != "nothing" and r["phase"] not in _ENDED and not r["waiting"]]
        silent = [r for r in ranks if r["left"] == "events" and r["phase"] not in _ENDED] if reported else []
        halted = stopped(ranks)
        for group, why in ((never, "left nothing: its process never started its recorder, or the run directory "
                                   "is not shared"),
                           (outside, None),
                           ([h[0] for h in halted], "stopped"),
                           (silent, "left no post-mortem while its peers did: killed, exited or stopped")):
            if group:
                first = min(group, key=_behind)
                if why == "stopped":  # the one that stopped running first
                    first, _, why = min(halted, key=lambda h: h[1])
                reason = why or "outside any collective" + \
                    (" while its peers wait in one" if len(ranks) > 1 else "")
                if why is None and first["left"] == "events" and reported:
                    reason = "left no post-mortem (killed, exited or stopped), " + reason
                if first["postmortem"]:
                    reason += f"; its post-mortem: {first['postmortem']}"
                break
        if first is None and ranks:
            steps = sorted({r["step"] for r in ranks})
            reason = (f"every rank waited in a collective (step {', '.join(map(str, steps))}): the hang is inside it "
                      f"(network, NCCL, a frozen process); see the stacks in postmortem/")
    out_first = None if first is None else {
        "rank": first["rank"], "host": first["host"], "phase": first["phase"], "step": first["step"],
        "reason": reason}
    result = {"run_dir": str(rd.path), "first": out_first, "reason": reason, "ranks": ranks,
              "first_exception": first_exc}
    result["lines"] = _lines(result)
    return result


def _when(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"


def _lines(result: dict) -> list[str]:
    first, ranks = result["first"], result["ranks"]
    out = []
    if first:
        out.append(f"first: rank {first['rank']} on {first['host']}, in {first['phase']} at step {first['step']}: "
                   f"{first['reason']}")
    else:
        out.append(result["reason"] or "no rank left anything to read")
    for r in ranks:
        if first and r["rank"] == first["rank"]:
            continue
        doing = f"waiting in {r['waiting']}" if r["waiting"] else f"in {r['phase']}"
        left = {"post-mortem": f"post-mortem: {r['postmortem']}", "events": "no post-mortem (killed, exited or "
                "stopped)", "nothing": "left nothing"}[r["left"]]
        out.append(f"  rank {r['rank']} on {r['host']}: {doing} at step {r['step']} since {_when(r['last_event_time'])}"
                   f"; last logged step {r['last_logged_step']}; {left}")
    exc = result["first_exception"]
    if exc:
        out.append(f"first exception: rank {exc['rank']} on {exc['host']} at {_when(exc['time'])}:")
        out += ["  " + line for line in exc["traceback"].rstrip().splitlines()[-12:]]
    stacks = [r["stacks"] for r in ranks if r["stacks"]]
    if stacks:
        out.append("stacks: " + " ".join(stacks))
    return out


def text(result: dict) -> str:
    return f"post-mortem of {result['run_dir']}\n" + "\n".join(result["lines"]) + "\n"


def present(run_dir: str | Path) -> bool:
    """Whether a run left post-mortems (the section `pipeline analyze` adds)."""
    d = Path(run_dir) / flight.POSTMORTEM
    return d.is_dir() and any(d.glob("rank-*.json"))


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (keys: docs/troubleshooting.md)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    from pipeline.emit import emit
    from pipeline.errors import UserError

    if not Path(a.run_dir).is_dir():
        raise UserError(f"{a.run_dir}: no such run directory")
    return emit(analyze(a.run_dir), a.json, text)

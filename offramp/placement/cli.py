"""``offramp placement status|plan|apply|start|stop``: look at and steer the placement controller.

* ``status``: current placement (stage -> layers, pool, replicas, precision), live signals,
  the plan, the controller's last decisions with reasons (from the running controller
  actor; without one, measured here over ``--window`` seconds).
* ``plan``: the plan it would make now and the moves that lead there (changes nothing).
* ``apply``: make those moves now, one at a time, through the same mover (make before
  break, durable intent, rollback) - an operator's order, so the hysteresis trigger is
  skipped; ``--dry-run`` only prints them. Refused while the controller actor runs.
  ``apply --split 3,6`` instead moves the split points there, live: one boundary per
  move (the stage gaining layers rolls first, then its neighbour), no request lost.
* ``start`` / ``stop``: run the controller in the cluster as a detached actor.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("placement", help="placement controller: status, plan, apply, start, stop",
                       description=__doc__.split("\n\n")[0])
    psub = p.add_subparsers(dest="placement", metavar="WHAT", required=True)
    for name, helptext, fn in (("status", "current placement, signals, plan, last decisions", _status),
                               ("plan", "the plan the controller would make now (changes nothing)", _plan),
                               ("apply", "make the plan's moves now (one at a time, make before break)", _apply),
                               ("start", "run the controller in the cluster (detached actor)", _start),
                               ("stop", "stop the controller actor", _stop)):
        c = psub.add_parser(name, help=helptext)
        c.add_argument("--address", default=None, help="Ray address (default: auto)")
        c.add_argument("--app", default="offramp", help="Serve application name")
        c.add_argument("--config", type=Path, help="controller config (YAML or JSON, ControllerConfig fields)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--window", type=float, default=4.0, help="seconds of signals to measure (no controller)")
        c.add_argument("--last", type=int, default=10, help="decisions to show")
        c.add_argument("--dry-run", action="store_true", help="decide and log, change nothing")
        if name == "apply":
            c.add_argument("--max-moves", type=int, default=1, help="moves to make now")
            c.add_argument("--split", type=_split_arg, metavar="B1,B2,...",
                           help="move the split points (first layer of stages 1..N-1) here instead, one "
                           "boundary at a time, while traffic flows; the number of stages stays")
        if name == "start":
            c.add_argument("--interval", type=float, help="seconds between control intervals")
        c.set_defaults(func=fn)


def _config(args):
    from offramp.placement.controller import ControllerConfig

    raw = {}
    if args.config:
        text = args.config.read_text()
        if args.config.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    raw.setdefault("app", args.app)
    if args.dry_run:
        raw.setdefault("policy", {})["dry_run"] = True
    if getattr(args, "interval", None):
        raw["interval_s"] = args.interval
    return ControllerConfig.model_validate(raw)


def _actor(args):
    from offramp.cluster import rayops
    from offramp.placement.controller import controller_name

    rayops.connect(args.address)
    return rayops.get_actor(controller_name(args.app))


def _local(args):
    """A controller in this process that has measured ``--window`` seconds of signals."""
    from offramp.placement.controller import PlacementController
    from offramp.placement.mover import RayOps

    ctl = PlacementController(_config(args), RayOps())
    ctl.observe()
    time.sleep(args.window)
    ctl.observe()
    return ctl


def _moves(ctl) -> list:
    from offramp.placement.policy import diff

    current, target, _, _ = ctl.make_plan(ctl.last_obs)
    return diff(current, target.deployments(), ctl.facts.model.num_layers)


def _status(args) -> int:
    from offramp.cluster import rayops

    actor = _actor(args)
    if actor is not None:
        st = rayops.call(actor, "status", args.last)
        st["controller"] = "running"
    else:
        ctl = _local(args)
        _moves(ctl)
        st = {**ctl.status(args.last), "controller": "not running (signals measured by this command)"}
    _print(st, args.json)
    return 0


def _plan(args) -> int:
    _actor(args)
    ctl = _local(args)
    moves = _moves(ctl)
    st = ctl.status(0)
    out = {"placement": st["placement"], "signals": st["signals"], "plan": st["plan"],
           "moves": [json.loads(m.model_dump_json()) for m in moves]}
    _print(out, args.json)
    return 0


def _split_arg(text: str) -> list[int]:
    import argparse

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected layer indices like 3,6") from None


def _apply_split(ctl, split: list[int], dry_run: bool) -> list[dict]:
    """Move the split points to ``split``, one boundary per move, each re-reading the live
    layers; a dry run shows the first move's Serve steps."""
    from dataclasses import asdict

    from offramp.placement.mover import MoveDeferred, MoveFailed, plan_steps
    from offramp.placement.planner import StagePlacement
    from offramp.placement.policy import Move

    cur = ctl.current()
    d = StagePlacement(start=0, end=split[0] if split else cur[0].end, pool=cur[0].pool,
                       precision=cur[0].precision, replicas=cur[0].replicas)
    m = Move(action="add", knob="split", deployment=d, split=split, replicas_from=d.replicas,
             replicas_to=d.replicas, reason=f"operator: split points -> {split}")
    done = []
    for _ in range(len(split) + 1):  # each boundary moves once, straight to its target
        rec = {"move": json.loads(m.model_dump_json())}
        try:
            if dry_run:
                steps = plan_steps(ctl.ops.deployed_app_config(ctl.cfg.app) or {}, ctl.facts.ranges, m)
                rec.update(steps=[asdict(s) for s in steps], result="dry run: not applied")
                done.append(rec)
                break  # the next boundary depends on this one being moved
            res = ctl.mover.apply(m)
        except (MoveDeferred, MoveFailed) as e:
            rec["result"] = f"{type(e).__name__}: {e}"
            done.append(rec)
            break
        if res.outcome == "noop":
            break  # reached
        rec.update(steps=res.steps, result=f"{res.outcome} in {res.seconds:.1f}s")
        done.append(rec)
    return done


def _apply(args) -> int:
    from offramp.placement.mover import MoveDeferred, MoveFailed

    if _actor(args) is not None and not args.dry_run:
        print("offramp placement apply: the controller actor is running and would race this command; "
              "run `offramp placement stop` first (or use --dry-run)", file=sys.stderr)
        return 2
    ctl = _local(args)
    if ctl.mover.intent() is not None:
        print(f"reconciling a half-done move first: {ctl.recover()}", file=sys.stderr)
    if args.split is not None:
        done = _apply_split(ctl, args.split, args.dry_run)
    else:
        done = []
        for m in _moves(ctl)[: args.max_moves]:
            rec = {"move": json.loads(m.model_dump_json())}
            if args.dry_run:
                rec["result"] = "dry run: not applied"
            else:
                try:
                    res = ctl.mover.apply(m)
                    rec["result"] = f"{res.outcome} in {res.seconds:.1f}s"
                except (MoveDeferred, MoveFailed) as e:
                    rec["result"] = f"{type(e).__name__}: {e}"
            done.append(rec)
    _print({"moves": done, "placement": ctl.status(0)["placement"]}, args.json)
    return 0 if all(not r["result"].startswith("MoveFailed") for r in done) else 1


def _start(args) -> int:
    from offramp.cluster import rayops
    from offramp.placement.controller import ControllerActor, controller_name

    cfg = _config(args)
    rayops.connect(args.address)
    actor = rayops.start_detached(ControllerActor, controller_name(cfg.app), cfg.model_dump(mode="json"))
    st = rayops.call(actor, "status", args.last, timeout=120)
    _print({"started": controller_name(cfg.app), "dry_run": st["dry_run"], "recovered": st["recovered"],
            "placement": st["placement"]}, args.json)
    return 0


def _stop(args) -> int:
    from offramp.cluster import rayops

    actor = _actor(args)
    if actor is None:
        print("no placement controller is running")
        return 0
    rayops.kill_actor(actor)
    print("placement controller stopped (a move in flight is reconciled by the next start)")
    return 0


def _print(st: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    if "controller" in st:
        print(f"controller: {st['controller']}{' (dry run)' if st.get('dry_run') else ''}")
    if st.get("placement"):
        print("stage  layers   pool  replicas  precision")
        for p in st["placement"]:
            print(f"{p['stage']:>5}  {p['layers'][0]:>2}-{p['layers'][1]:<4} {p['pool']:>5}  {p['replicas']:>8}  "
                  f"{p['precision']:>9}")
    sig = st.get("signals")
    if sig:
        print(f"signals over {sig['window_s']:.1f}s (arrivals from {sig['source']}, TPOT p99 {sig['tpot_ms_p99']} ms):")
        for s in sig["stages"]:
            busy = ", ".join(f"{v:.0%}" for v in s["busy"].values())
            print(f"  stage {s['stage']}: {s['arrival_per_s']:.1f} rows/s, busy [{busy}], queue {s['queue']}, "
                  f"KV {s['kv_occupancy']:.0%}")
    for name, f in (st.get("pool_fits") or {}).items():
        print(f"pool {name} (fitted to {f['samples']} start-up profile samples): overhead "
              f"{1e3 * f['fixed_overhead_s']:.2f} ms, {f['mem_bandwidth'] / 1e9:.1f} GB/s, {f['flops'] / 1e9:.1f} GFLOP/s")
    if st.get("plan"):
        pl = st["plan"]
        slo = "no SLO" if pl.get("slo_ms") is None else (
            f"SLO {pl['slo_ms']} ms {'met' if pl.get('meets_slo') else 'NOT met'}")
        print(f"plan ({'exit-aware' if pl.get('exit_aware', True) else 'exit-unaware'}): cost "
              f"{pl['cost_per_hour']:.2f}/h, predicted TPOT mean {pl['tpot_ms']} ms, p99 {pl.get('tpot_p99_ms')} ms "
              f"({slo}): " + "; ".join(
                  f"{s['layers'][0]}-{s['layers'][1]} {s['pool']} x{s['replicas']} ({s['utilisation']:.0%})"
                  for s in pl["stages"]))
        for r in pl.get("reasons", []):
            print(f"  why {r}")
        for n in pl.get("notes", []):
            print(f"  note: {n}")
    for m in st.get("moves", []):
        mv = m.get("move", m)
        print(f"move: {mv['action']} {mv['deployment']['start']}-{mv['deployment']['end'] - 1} "
              f"{mv['deployment']['pool']} {mv['replicas_from']}->{mv['replicas_to']}  {m.get('result', mv['reason'])}")
    for d in st.get("decisions", []):
        print(f"[{time.strftime('%H:%M:%S', time.localtime(d['time']))}] {d['outcome']}: {d.get('reason', d.get('event'))}"
              + (f" -> {d['result']}" if d.get("result") else ""))
    if st.get("recovered"):
        print(f"recovered at start: {st['recovered']}")

"""``offramp cluster up|down|status``: a local heterogeneous Ray cluster for development."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("cluster", help="start/stop a local Ray cluster with GPU-pool and CPU-pool nodes",
                       description="A local multi-node Ray cluster on this machine. Stages are placed on a pool "
                       "by asking for the pool_gpu / pool_cpu resource in the Serve config (see configs/gpu-cpu.yaml).")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    u = csub.add_parser("up", help="start the cluster (head + pool nodes, loopback only)")
    u.add_argument("--gpu-nodes", type=int, default=1, help="GPU-pool nodes (real GPUs used when present; default 1)")
    u.add_argument("--cpu-nodes", type=int, default=2, help="CPU-pool nodes (default 2)")
    u.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs each node declares (default 4)")
    u.set_defaults(func=_up)
    d = csub.add_parser("down", help="stop the local cluster started by `offramp cluster up`")
    d.set_defaults(func=_down)
    s = csub.add_parser("status", help="nodes and pools of the running cluster")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)


def _up(args) -> int:
    from offramp.cluster import local

    info = local.up(args.gpu_nodes, args.cpu_nodes, args.cpus_per_node)
    print(f"cluster up at {info.address}: {info.gpu_nodes} GPU-pool node(s) ({info.real_gpus} real GPUs), "
          f"{info.cpu_nodes} CPU-pool node(s)")
    print(f"next: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 serve run --address {info.address} configs/gpu-cpu.yaml")
    return 0


def _down(args) -> int:
    from offramp.cluster import local

    local.down()
    print("cluster stopped")
    return 0


def _status(args) -> int:
    from offramp.cluster import local

    st = local.status()
    if args.json:
        print(json.dumps(st, indent=2))
    elif not st.get("running"):
        print("no local cluster running" + (f" ({st['error']})" if "error" in st else ""))
        return 1
    else:
        print(f"cluster at {st['address']}")
        for n in st["nodes"]:
            print(f"  {n['pool']:<5} alive={n['alive']} cpus={n['cpus']} gpus={n['gpus']}")
    return 0

"""The Serve application: ``import_path: offramp.deployments.app:build_app``.

Deployments: ``OfframpIngress`` (HTTP, OpenAI API) and ``Stage0`` … ``Stage{N-1}``, one per
pipeline stage. Each stage replica loads only its layers, owns their KV cache and its
exit gate, and serves rows over the stage channel (:mod:`offramp.deployments.channel`).
Replicas, pools (``ray_actor_options.resources: {pool_gpu: 1}`` / ``{pool_cpu: 1}``) and
autoscaling are per deployment in the Serve config YAML; re-applying a config with one
stage's ``num_replicas`` changed scales that stage alone (arguments here are
deterministic, so nothing else changes).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve
from ray.serve import Application

from offramp.api.grpc_service import GrpcIngressMixin
from offramp.cluster import rayops
from offramp.cluster.local import HAPROXY_ENV
from offramp.cluster.records import StageRecord
from offramp.deployments.config import (INGRESS_NAME, STAGE_DTYPE_ENV, STAGE_LAYERS_ENV, AppArgs, StageArgs,
                                       default_micro_batches, model_facts, placement_controller, stage_name, stage_range,
                                       stage_threads)

log = logging.getLogger("offramp")
INGRESS_TPOT_WINDOW_S = 30.0  # the TPOT percentiles an ingress replica reports to the registry cover this


def _stage_args(args: AppArgs, index: int) -> StageArgs:
    return args.stages[index] if index < len(args.stages) else StageArgs()


@serve.deployment(max_ongoing_requests=64, max_queued_requests=256, health_check_period_s=5,
                  graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 0.5})
class StageDeployment:
    """One pipeline stage. Serve calls are control only (info, stats); data goes over the channel."""

    def __init__(self, index: int, args: dict):
        import torch

        from offramp.deployments.channel import StageServer
        from offramp.ops.stage import load_stage
        from offramp.ops.worker import StageWorker

        args = AppArgs.model_validate(args)
        model_dir, spec, ranges, exits = model_facts(args)
        if index >= len(ranges):
            raise ValueError(f"{stage_name(index)} exists but the split makes {len(ranges)} stages; "
                             "remove the extra deployment from the config")
        sa = _stage_args(args, index)
        if os.environ.get(STAGE_DTYPE_ENV):  # set per deployment by a placement precision move
            try:
                sa = StageArgs.model_validate({**sa.model_dump(), "dtype": os.environ[STAGE_DTYPE_ENV]})
            except ValueError as e:
                raise ValueError(f"{STAGE_DTYPE_ENV}: {e}") from None
        # Layers: a placement split move sets them per deployment (the app's split is the start).
        try:
            layers = stage_range(tuple(ranges[index]), index, len(ranges), spec.num_layers,
                                 os.environ.get(STAGE_LAYERS_ENV))
        except ValueError as e:
            raise ValueError(f"{stage_name(index)}: {e}") from None
        # The pool this replica really runs in: a placement move changes the deployment's
        # pool resource, not the app args.
        pool = rayops.assigned_pool(sa.pool)
        device = "cuda" if pool == "gpu" and torch.cuda.is_available() else "cpu"
        threads = stage_threads(sa.threads, os.environ.get("OMP_NUM_THREADS"), rayops.assigned_cpus())
        if threads is not None:
            torch.set_num_threads(threads)
        stage = load_stage(model_dir, spec, layers, first=index == 0, last=index == len(ranges) - 1,
                           exits=exits, dtype=sa.dtype, device=device)
        max_seq = min(args.max_context or spec.max_position, spec.max_position)
        self.worker = StageWorker(stage, index, len(ranges), exits, max_slots=sa.max_sequences, max_seq=max_seq,
                                  kv_fill=args.exit.kv_fill, device=device, compile=sa.compile)
        # Warm-up + a quick profile of the bare layers before the replica takes traffic (its
        # first requests do not pay lazy initialisation; the controller seeds its cost model).
        emulate = args.emulate_pools.get(pool)
        emulate = None if emulate is None else emulate.for_layers(layers[1] - layers[0])
        profile = self.worker.profile() if sa.profile_on_start else []
        if emulate is not None:  # a modelled device: its profile is the modelled speed
            profile = [{**p, "seconds": max(p["seconds"], emulate.seconds(p["batch"]))} for p in profile]
        self.drain_s = sa.drain_s
        self.app_name, self.replica = rayops.replica_context()
        registry = rayops.registry(self.app_name)
        token = rayops.channel_token(self.app_name)
        host = rayops.node_ip() if args.channel_host == "node" else args.channel_host
        self.server = StageServer(self.worker, token, host=host, max_batch_size=sa.max_batch_size,
                                  batch_wait_timeout_s=sa.batch_wait_timeout_s, stats=self._record,
                                  labels={"pool": pool, "replica": self.replica, "precision": sa.dtype},
                                  emulate=emulate, lease_s=args.kv_lease_s,
                                  ssl_context=args.channel_tls.server_context() if args.channel_tls else None,
                                  client_ssl_context=args.channel_tls.client_context() if args.channel_tls else None,
                                  link_delay_s=args.emulate_link_ms / 1000)
        self.entry = StageRecord(stage=index, replica=self.replica, host=self.server.host, port=self.server.port,
                                 layers=(int(layers[0]), int(layers[1])), pool=pool, device=device, dtype=sa.dtype,
                                 profile=tuple(profile))
        self.steps = {"batches": 0, "rows": 0, "positions": 0, "busy_s": 0.0,
                      "decode_batches": 0, "decode_s": 0.0,  # batches of one position per row
                      "prefill_batches": 0, "prefill_s": 0.0, "prefill_positions": 0}  # the others
        rayops.get(registry.register.remote(self.entry))
        self.heartbeat = rayops.Heartbeat(self.app_name, self.replica, self._beat, "offramp-heartbeat")
        log.info("stage %d (layers %s) serving on %s:%d, %s %s", index, layers, self.server.host,
                 self.server.port, device, sa.dtype)

    def _record(self, rows: int, positions: int, seconds: float, drafted: list[int] = ()) -> None:
        """One channel step; a drafting row ran one more forward pass per draft, so passes
        (``batches``), rows and positions count those: the placement controller's arrivals
        at the drafting stage are its passes, and its step time must be per pass too."""
        passes = 1 + max(drafted, default=0)
        rows, positions = rows + sum(drafted), positions + sum(drafted)
        self.steps["batches"] += passes
        self.steps["rows"] += rows
        self.steps["positions"] += positions
        self.steps["busy_s"] += seconds
        if positions == rows:
            self.steps["decode_batches"] += passes
            self.steps["decode_s"] += seconds
        else:
            self.steps["prefill_batches"] += 1
            self.steps["prefill_s"] += seconds
            self.steps["prefill_positions"] += positions

    def _beat(self, registry) -> None:
        if not rayops.get(registry.heartbeat.remote(self.replica, self.beat_stats()), timeout=10):
            rayops.get(registry.register.remote(self.entry), timeout=10)  # the registry restarted

    def stats(self) -> dict:
        return {**self.steps, **self.server.info()}

    def beat_stats(self) -> dict:
        """What a heartbeat publishes: :meth:`stats` plus the longest queue wait since the last beat."""
        return {**self.stats(), "max_wait_s": self.server.take_max_wait(),
                "memory_headroom_bytes": _memory_headroom(self.entry.device)}

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: its channel thread, loop or batcher
        died or is wedged (a replica that cannot serve must not look healthy)."""
        problem = self.server.health()
        if problem is not None:
            raise RuntimeError(f"stage {self.worker.index}: {problem}")

    async def __del__(self):
        """Serve's graceful shutdown (scale-down, rolling update, removal): leave the
        registry so no new sequence is routed here, let the sequences in flight finish on
        their old path for up to ``drain_s`` (past it they replay on live replicas), close."""
        if getattr(self, "heartbeat", None) is None:
            return
        from offramp.deployments.pipeline import REFRESH_S

        self.heartbeat.stop()
        end = time.monotonic() + self.drain_s
        await asyncio.sleep(0.3)
        self.heartbeat.stop()  # a beat in flight when we left may have registered us again
        # An ingress may route a new sequence here until its next registry refresh.
        await asyncio.sleep(min(REFRESH_S + 0.5, self.drain_s))
        idle = 0
        while idle < 3 and time.monotonic() < end:  # empty for 3 checks in a row: no late arrival
            idle = idle + 1 if not self.worker.cache.slot_of else 0
            await asyncio.sleep(0.2)
        if self.worker.cache.slot_of:
            log.info("stage %d: drain deadline, %d sequences will replay elsewhere", self.worker.index,
                     len(self.worker.cache.slot_of))
        self.server.close()


def _memory_headroom(device: str) -> int | None:
    """Free memory where this stage's weights and KV live: the GPU's, else the host's."""
    try:
        if device == "cuda":
            import torch

            return int(torch.cuda.mem_get_info()[0])
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def start_placement(app_name: str, placement: dict) -> None:
    """Start the app's placement controller (``AppArgs.placement``) unless it runs: it is a
    named detached actor, so other ingress replicas, a restarted ingress and ``offramp
    placement start`` get the one that exists. Never waits for it and never raises: serving
    must not depend on its controller (``offramp placement status`` shows whether it runs)."""
    try:
        ctl = placement_controller()
        rayops.start_detached(ctl.ControllerActor, ctl.controller_name(app_name), {**placement, "app": app_name})
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("placement controller of app %r not started (%s: %s); the placement stays as deployed until "
                    "one runs (`offramp placement start --app %s`)", app_name, type(e).__name__, e, app_name)


# max_ongoing_requests above AppArgs.max_active_requests (1024): past that the ingress answers
# an OpenAI 429 itself; Serve's own overflow (past max_queued_requests) is a plain-text 503.
@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=1280, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class OfframpIngress(GrpcIngressMixin):
    """HTTP (OpenAI API, from ``__serve_build_asgi_app__``) and gRPC (``Generate``,
    ``GenerateStream``, ``Health`` from the mixin) over the same frontend and pipeline."""

    def __init__(self, args: dict, *stages):
        from offramp.api.frontend import Frontend
        from offramp.api.text import load_tokenizer
        from offramp.deployments.pipeline import PipelineBackend, Router
        from offramp.ops.online_tuning import AgreementTuner

        args = AppArgs.model_validate(args)
        model_dir, spec, ranges, exits = model_facts(args)
        self.stages = stages  # Serve handles: control calls
        app_name, _ = rayops.replica_context()
        registry = rayops.registry(app_name)
        token = rayops.channel_token(app_name)

        async def lookup():
            return await registry.routing.remote()

        max_seq = min(args.max_context or spec.max_position, spec.max_position)
        router = Router(len(ranges), token, lookup, num_layers=spec.num_layers,
                        ssl_context=args.channel_tls.client_context() if args.channel_tls else None,
                        link_delay_s=args.emulate_link_ms / 1000)
        self.backend = PipelineBackend(
            len(ranges), router, eos_token_ids=spec.eos_token_ids, max_seq=max_seq,
            vocab_size=spec.vocab_size, kv_fill=args.exit.kv_fill, request_timeout_s=args.request_timeout_s,
            default_exit=args.exit.mode, default_threshold=args.exit.threshold,
            max_active=args.max_active_requests, model_name=args.model_name, audit_rate=args.exit.audit_rate,
            lease_s=args.kv_lease_s, micro_batches=default_micro_batches(args.micro_batches, len(ranges)),
            chain=args.chain_forwarding,
            max_draft=args.exit.max_draft, draft_max_active=args.exit.draft_max_active,
            gate_max_active=args.exit.gate_max_active,
            tuner=AgreementTuner(target=exits.calibration.target if exits and exits.calibration else 0.98,
                                 enabled=args.exit.online_tuning))
        self.frontend = Frontend.from_app_args(args, self.backend, load_tokenizer(model_dir),
                                               model_context=spec.max_position)
        # Publish this replica's counters to the registry, so the placement controller
        # sees every ingress replica's traffic, not whichever one answers an HTTP GET.
        self.heartbeat = rayops.Heartbeat(app_name, rayops.replica_context()[1], self._beat, "offramp-ingress-beat")
        if any(os.environ.get(k) != v for k, v in HAPROXY_ENV.items()) and \
                os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            log.info("streamed tokens pass through Serve's Python proxy (one Ray object per SSE event); start "
                     "Ray with RAY_SERVE_ENABLE_HA_PROXY=1 (e.g. `RAY_SERVE_ENABLE_HA_PROXY=1 serve run "
                     "configs/local.yaml`) so HAProxy forwards them straight from this replica")
        from offramp.api.auth import check_exposure

        key = self.frontend.settings.api_key
        check_exposure(rayops.http_host(), rayops.grpc_serving(), key.get_secret_value() if key else None,
                       args.api_key_env)
        if args.placement is not None:
            start_placement(app_name, args.placement)

    def _beat(self, registry) -> None:
        stats = self.backend.stats(window_s=INGRESS_TPOT_WINDOW_S)
        rayops.get(registry.ingress_heartbeat.remote(self.heartbeat.replica, stats), timeout=10)

    def __del__(self):
        if getattr(self, "heartbeat", None) is not None:
            self.heartbeat.stop()

    def __serve_build_asgi_app__(self):
        from offramp.api.app import create_app

        app = create_app(self.frontend)

        @app.get("/v1/offramp/stats")
        async def stats(reset: bool = False):
            """Stage calls on this ingress replica and server-side TTFT/TPOT since the last reset."""
            return self.backend.stats(reset)

        return app


def build_app(args: AppArgs) -> Application:
    """Typed Serve app builder: ``serve run offramp.deployments.app:build_app model=...`` or a config YAML."""
    return build_app_with_env(args)


def build_app_with_env(args: AppArgs, env_vars: dict[str, str] | None = None) -> Application:
    """:func:`build_app` with ``env_vars`` set in every replica's environment (e.g. the
    ``OTEL_*`` variables); a config YAML does the same with the app's ``runtime_env``."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    _, spec, ranges, _ = model_facts(args)  # fail fast, in the caller, with a clear message
    raw = args.model_dump(mode="json")

    def opts(deployment, **kw):
        if env_vars:
            actor = {**deployment.ray_actor_options, "runtime_env": {"env_vars": dict(env_vars)}}
            kw["ray_actor_options"] = actor
        return deployment.options(**kw)

    stages = [opts(StageDeployment, name=stage_name(i)).bind(i, raw) for i in range(len(ranges))]
    return opts(OfframpIngress).bind(raw, *stages)


"""Typed arguments of the Serve application (``import_path: offramp.deployments.app:build_app``).

These are the ``args:`` of an application in a Serve config YAML. Per-deployment Serve
settings (``num_replicas``, ``ray_actor_options`` for pool placement, ``autoscaling_config``)
stay in the YAML's ``deployments:`` list under the names ``OfframpIngress`` and
``Stage0`` … ``Stage{N-1}``.
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import ipaddress
import time
from typing import Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from offramp.cluster import pool_of
from offramp.errors import ConfigError
from offramp.protocol import DEFAULT_MAX_DRAFT, MAX_DRAFT_LIMIT

Pool = Literal["gpu", "cpu", "any"]
Precision = Literal["fp32", "bf16", "fp16", "int8"]  # int8: weight-only (offramp.ops.quant)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Per-deployment precision override, set by a placement precision move in the deployment's
# ray_actor_options.runtime_env.env_vars (read by StageDeployment before stages[].dtype).
STAGE_DTYPE_ENV = "OFFRAMP_STAGE_DTYPE"
# Per-deployment layer range override ("start:end", half-open like a Python slice), set by
# a placement split move; read by StageDeployment before the app's split.
STAGE_LAYERS_ENV = "OFFRAMP_STAGE_LAYERS"
DEFAULT_KV_LEASE_S = 30.0  # see AppArgs.kv_lease_s
# offramp.placement imports this package (its mover names deployments and env vars from here),
# so the app reaches its placement controller by module name, as offramp.cli reaches its
# commands: an import statement back would make the two packages a cycle.
PLACEMENT_CONTROLLER = "offramp.placement.controller"


INGRESS_NAME = "OfframpIngress"


def placement_controller():
    """The placement controller's module (``ControllerConfig``, ``ControllerActor``, ``controller_name``)."""
    return importlib.import_module(PLACEMENT_CONTROLLER)


def stage_name(k: int) -> str:
    """The Serve deployment name of stage ``k`` (the one place it is spelled)."""
    return f"Stage{k}"


def parse_layers(value: str) -> tuple[int, int]:
    """``"3:6"`` -> ``(3, 6)`` (layers 3, 4, 5). Raises ValueError naming the fix."""
    try:
        a, b = (int(x) for x in str(value).split(":"))
    except ValueError:
        raise ValueError(f"{STAGE_LAYERS_ENV}={value!r}: expected 'start:end' (layers start..end-1, "
                         "e.g. '3:6')") from None
    if not 0 <= a < b:
        raise ValueError(f"{STAGE_LAYERS_ENV}={value!r}: needs 0 <= start < end")
    return a, b


def stage_range(default: tuple[int, int], index: int, num_stages: int, num_layers: int,
                override: str | None) -> tuple[int, int]:
    """Stage ``index``'s layers: the override (validated against the model) or ``default``."""
    if not override:
        return default
    a, b = parse_layers(override)
    if b > num_layers:
        raise ValueError(f"{STAGE_LAYERS_ENV}={override!r}: the model has {num_layers} layers")
    if index == 0 and a != 0:
        raise ValueError(f"{STAGE_LAYERS_ENV}={override!r}: Stage0 must start at layer 0 (it embeds tokens)")
    if index == num_stages - 1 and b != num_layers:
        raise ValueError(f"{STAGE_LAYERS_ENV}={override!r}: the last stage must end at layer {num_layers} "
                         "(it holds the LM head)")
    return a, b


def default_micro_batches(given: int | None, num_stages: int) -> int:
    """The ingress's lanes: ``given``, else 1 for one stage (nothing to overlap but the
    ingress's own turn, and one pass of every active sequence beats two half passes:
    +23% tokens/s at 16 streams measured, 2114 vs 1717) and 2 for a pipeline (two lanes keep two stages
    busy; three measured worse on 2 cores, docs/benchmarks.md)."""
    if given is not None:
        return given
    return 1 if num_stages == 1 else 2


def stage_threads(configured: int | None, env: str | None, num_cpus: float | None) -> int | None:
    """Intra-op threads of a stage's forward pass: the configured count, else
    ``OMP_NUM_THREADS``, else the replica's CPU reservation rounded down (at least 1).
    None: leave torch's default (outside a Ray worker, nothing reserved).

    torch's default is every core of the machine: replicas that share a machine (two stages,
    the ingress, the proxy on the 2-core dev machine) would then run more threads than there
    are cores, and OpenMP's spinning barriers make each forward pass slower. Ray already sets
    ``OMP_NUM_THREADS`` from ``num_cpus`` in its workers; ``threads`` overrides it (e.g. a
    replica alone on a node that reserves 0.5 CPU for scheduling but may use every core)."""
    if configured is not None:
        return configured
    try:
        if env and int(env) > 0:
            return int(env)
    except ValueError:
        pass
    if num_cpus is None or num_cpus <= 0:
        return None
    return max(1, int(num_cpus))


class StageArgs(BaseModel):
    """Settings of one stage deployment (index = position in ``AppArgs.stages``)."""

    model_config = ConfigDict(extra="forbid")

    pool: Pool = Field("any", description="Device pool the stage is meant for; 'gpu' runs on CUDA when the replica sees one.")
    dtype: Precision = Field("fp32", description="Weights/KV precision of this stage.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most sequences in one forward pass.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="How long a forward pass waits to fill a batch.")
    max_sequences: int = Field(64, ge=1, description="KV slots (concurrent sequences) per replica.")
    drain_s: float = Field(15.0, ge=0, le=600, description="On shutdown (scale-down, rolling update), how long "
                           "sequences in flight may finish on this replica before they replay elsewhere; keep it "
                           "below the deployment's graceful_shutdown_timeout_s (30 s by default).")
    threads: int | None = Field(
        None, ge=1, le=512, description="Intra-op CPU threads of this stage's forward pass. Default: "
        "OMP_NUM_THREADS when set, else the replica's num_cpus rounded down, at least 1. More threads than the "
        "cores a replica owns make replicas that share a machine spin against each other.")
    compile: bool = Field(False, description="torch.compile this stage's decoder blocks (inductor; on CPU it needs "
                          "a C compiler, e.g. gcc). Pays where a pass is dispatch-bound (small models, few rows a "
                          "pass); each replica compiles its graphs before it takes traffic (the first time on a "
                          "node: ~1.5 min per stage on 2 cores; seconds once inductor's cache in /tmp holds them).")
    profile_on_start: bool = Field(True, description="Warm up and time the stage's layers at a few batch sizes "
                                   "before serving; the placement controller fits the pool's speed from it.")


class EmulatedDevice(BaseModel):
    """A modelled device speed for one pool (tests and benchmarks on machines that lack it).

    After each forward pass a replica in that pool waits until ``step_s + max(mem_s,
    per_token_s x positions)`` seconds have passed since the pass began: the roofline of
    :mod:`offramp.placement.cost_model` (fixed overhead, then weight reads or compute,
    whichever binds), so a pool fitted by ``fit_profile`` can be emulated as it was fitted
    (``offramp bench placement --exit-aware`` does: a measured pool, slowed by a stated
    factor). The wait is an ``asyncio`` sleep:
    it holds the replica (one pass at a time, like a busy device) but no CPU core, so a
    second replica of an emulated pool adds capacity even on a 2-core laptop.
    """

    model_config = ConfigDict(extra="forbid")

    step_s: float = Field(0.0, ge=0, le=10, description="Fixed time of one forward pass (launch, weight reads).")
    per_token_s: float = Field(0.0, ge=0, le=10, description="Time per position in the batch (compute).")
    mem_s: float = Field(0.0, ge=0, le=10, description="Least time of the part after step_s (weight reads), "
                         "whatever the positions: a pass is memory-bound until per_token_s x positions exceeds it.")

    layers: int | None = Field(None, ge=1, description="Layers of the stage these times were modelled for; a stage "
                               "of other depth scales mem_s and per_token_s by its layers over these (step_s, the "
                               "fixed part of a pass, stays). None: every stage takes these times, whatever its depth.")

    def seconds(self, positions: int) -> float:
        return self.step_s + max(self.mem_s, self.per_token_s * positions)

    async def hold(self, lengths: list[int], drafted: list[int], started: float) -> None:
        """Wait out what this device would still take for a stage step that began at
        ``started`` (``time.perf_counter``): one pass over ``lengths`` positions, then one
        pass per drafting round over the rows still drafting (``drafted``: drafts per row).
        An ``asyncio`` sleep: it holds the replica (the stage server awaits it) and no core."""
        modelled = self.seconds(sum(lengths)) + sum(
            self.seconds(sum(d >= j for d in drafted)) for j in range(1, max(drafted, default=0) + 1))
        left = modelled - (time.perf_counter() - started)
        if left > 0:
            await asyncio.sleep(left)

    def for_layers(self, layers: int) -> "EmulatedDevice":
        """This device's times for a stage of ``layers`` layers."""
        if self.layers is None or layers == self.layers:
            return self
        f = layers / self.layers
        return self.model_copy(update={"mem_s": self.mem_s * f, "per_token_s": self.per_token_s * f, "layers": layers})


class ExitArgs(BaseModel):
    """Server-wide early-exit policy; requests may tighten or loosen it."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["calibrated", "off", "threshold", "speculative"] = Field(
        "calibrated", description="Policy of requests that ask for 'calibrated' (the API's default): 'calibrated' "
        "uses the exits file's thresholds; 'threshold' uses `threshold` at every gate; 'speculative' drafts with "
        "the first stage's exit head and verifies each draft in one visit to the deep stages (needs kv_fill "
        "'exact' and an exit head where Stage0 ends)."
    )
    threshold: float | None = Field(None, ge=0, le=1, description="Confidence threshold when mode='threshold'.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """``mode: off`` in a YAML file parses as the boolean false (YAML 1.1): it means "off"."""
        if v is False:
            return "off"
        if isinstance(v, bool):
            raise ValueError("exit.mode is a boolean; write one of calibrated, off, threshold, speculative "
                             "(quote it in YAML: mode: \"off\")")
        return v

    kv_fill: Literal["exact", "propagate"] = Field(
        "exact", description="KV of skipped layers: exact deferred backfill, or approximate state propagation."
    )
    max_draft: int = Field(
        DEFAULT_MAX_DRAFT, ge=1, le=MAX_DRAFT_LIMIT, description="Speculative requests that do not set max_draft: "
        "most tokens Stage0 drafts per visit to the deep stages. Longer drafts save more visits when the exit "
        "head agrees with the full model, and waste more deep compute when it does not.")
    draft_max_active: int | None = Field(
        1, ge=0, description="Speculative rows draft only while this ingress replica runs at most this many "
        "requests; above it they decode one token per step (still exact). Drafting adds an exit-head pass per "
        "drafted token: it pays when a deep visit costs more than its compute (one stream, a slow deep pool) and "
        "costs throughput when the stages are compute-bound (docs/benchmarks.md, speculative exits). null: always "
        "draft.")
    gate_max_active: int | None = Field(
        None, ge=0, description="Calibrated and threshold exits are tried only while this ingress replica runs "
        "at most this many requests; above it every row runs full depth (as with exits off, so no gate or exit-head "
        "work and no backfill chunks). Exits are a latency tool: they save a hop per exited token, which pays at "
        "low load and costs throughput when the stages are compute-bound (docs/benchmarks.md, 'Exits follow "
        "load'). null: always try the gates.")
    audit_rate: float = Field(
        0.25, ge=0, le=1, description="Fraction of greedy steps reaching the last stage that also check the "
        "exited tokens they backfill against full depth (one LM-head call on those rows; exact backfill only).")
    online_tuning: bool = Field(
        True, description="Raise a gate's threshold while its audited agreement is below the calibration target, "
        "and lower it back (never below the calibrated value); false = audit and report only.")

    @model_validator(mode="after")
    def _threshold_given(self) -> "ExitArgs":
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("exit.mode is 'threshold' but exit.threshold is not set; set exit.threshold (0..1)")
        if self.mode == "speculative" and self.kv_fill == "propagate":
            raise ValueError("exit.mode is 'speculative' but exit.kv_fill is 'propagate' (approximate K/V; "
                             "speculative output is exact); set exit.kv_fill to 'exact' or exit.mode to 'calibrated'")
        return self


class ChannelTLS(BaseModel):
    """Mutual TLS on the stage channels, from files a Secret mounts (cert-manager's
    ``tls.crt`` / ``tls.key`` / ``ca.crt``): each stage replica serves with its certificate
    and asks the connecting ingress for one; both sides verify the peer against ``ca_file``,
    a CA for the channels alone. Host names are not checked (pod IPs change; the
    certificates name no address), the private CA is what admits a peer."""

    model_config = ConfigDict(extra="forbid")

    cert_file: str = Field(..., description="PEM certificate this process presents (server and client).")
    key_file: str = Field(..., description="Its PEM private key.")
    ca_file: str = Field(..., description="PEM CA that signed every channel certificate.")

    def _context(self, purpose: "ssl.Purpose"):
        import ssl
        from pathlib import Path

        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if not Path(path).is_file():
                raise ConfigError(f"channel_tls.{name} {path!r} is not a readable file in this process; mount "
                                  "the channel TLS Secret there (Helm: channel.tls.secretName)")
        ctx = ssl.create_default_context(purpose, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self):
        import ssl

        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self):
        import ssl

        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False  # the CA, not an address, admits the peer (see above)
        return ctx


class AppArgs(BaseModel):
    """Arguments of :func:`offramp.deployments.app.build_app`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Local Hugging Face checkpoint directory; None = the embedded default model.")
    model_name: str = Field("offramp-default", description="Name clients pass as `model` in the OpenAI API.")
    num_stages: int | None = Field(None, ge=1, description="Split the layers evenly into this many stages.")
    split: list[int] | None = Field(None, description="Explicit split points (layer indices where a new stage starts).")
    stages: list[StageArgs] = Field(default_factory=list, description="Per-stage settings; missing entries use defaults.")
    exit: ExitArgs = Field(default_factory=ExitArgs, description="Early-exit policy.")
    max_context: int | None = Field(None, ge=8, description="Cap on prompt + generated tokens; default the model's context.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    api_key_env: str = Field("OFFRAMP_API_KEY", description="Environment variable holding the API key (empty = no key).")
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline for one request end to end.")
    max_active_requests: int = Field(1024, ge=1, description="Requests one ingress replica admits at once, running "
                                     "or waiting for a stage KV slot; more get 429.")
    micro_batches: int | None = Field(
        None, ge=1, le=64, description="Micro-batches the ingress's step scheduler keeps in flight: active sequences "
        "are spread over this many lanes that step concurrently, so different stages compute different lanes at once "
        "(pipeline parallelism). 1 = one batch walks the stages in turn. Default: 1 with one stage (no pipeline to "
        "fill: every active sequence in each pass), 2 with more (docs/benchmarks.md).")
    chain_forwarding: bool = Field(
        True, description="Stages send a token's continuing rows straight on to the next stage, which answers the "
        "ingress (ingress -> stage 0 -> ... -> last -> ingress: stages + 1 messages per deep token instead of "
        "2 x stages). false = every stage answers the ingress, which sends the rows on.")
    kv_lease_s: float = Field(
        DEFAULT_KV_LEASE_S, ge=2, le=3600, description="A stage replica reclaims a sequence's KV when nothing for it (a step, or "
        "the ingress's renewal of live sequences) arrived for this long: faults, lost releases and dead ingress "
        "replicas cannot leak KV slots. Renewals go out 4x per period.")
    channel_host: str = Field(
        "node", description="Where stage replicas listen for their stage channel (token-authenticated): 'node' = "
        "the Ray node's IP, reachable from the other nodes (clusters); '127.0.0.1' = loopback only, for a "
        "one-machine `serve run` (configs/local.yaml), where nothing else needs to reach them.")
    channel_tls: ChannelTLS | None = Field(
        None, description="Mutual TLS on the stage channels (files mounted from a Secret); None = plain TCP, "
        "peers admitted by the channel token only.")
    emulate_pools: dict[Pool, EmulatedDevice] = Field(
        default_factory=dict,
        description="Testing/benchmarks only: pool name -> modelled step time that replicas in that pool "
        "take at least (see EmulatedDevice). Empty in production.",
    )
    emulate_link_ms: int = Field(
        0, ge=0, le=1000, description="Testing/benchmarks only: every stage-channel message (ingress to stage, "
        "stage to stage, stage to ingress) is delivered this many milliseconds after it arrives, as if each "
        "replica ran on its own machine that far away (one-way latency; loopback has ~0.03 ms). Whole "
        "milliseconds: Serve's replicas run uvloop, whose timers tick in milliseconds. 0 in production.")
    placement: dict[str, Any] | None = Field(
        None, description="Run the placement controller for this app: ControllerConfig settings "
        "(offramp.placement.controller, docs/placement.md) without `app`, which is this app's name. The ingress "
        "starts it as the detached actor `placement-<app>` unless one runs, so `offramp placement status|stop` "
        "reach it. None: only `offramp placement start` runs one.")

    @field_validator("channel_host")
    @classmethod
    def _channel_host(cls, v: str) -> str:
        if v == "node":
            return v
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"channel_host {v!r}: use 'node' (the Ray node's IP) or an IP address such as "
                             "'127.0.0.1'") from None
        return v

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """Checked here, where a bad value fails the deploy: the controller starts in the
        background, where it would only be a log line."""
        if v is None:
            return v
        if "app" in v:
            raise ValueError("placement.app is set; remove it: the controller manages the application these "
                             "args belong to")
        config = placement_controller().ControllerConfig
        try:
            config.model_validate(v)
        except ValidationError as e:
            raise ValueError("; ".join(_placement_error(err, config) for err in e.errors())) from None
        return v

    @model_validator(mode="after")
    def _split_xor_stages(self) -> "AppArgs":
        if self.num_stages is not None and self.split is not None and self.num_stages != len(self.split) + 1:
            raise ValueError(
                f"num_stages={self.num_stages} but split={self.split} makes {len(self.split) + 1} stages; "
                "give only one of them"
            )
        return self


def _placement_error(err: dict, config: type[BaseModel]) -> str:
    """One ControllerConfig error as ``placement.<field>: <what to do>``."""
    where = ".".join(["placement", *map(str, err["loc"])])
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
        known = ", ".join(n for n in config.model_fields if n != "app")
        return f"{where} is not a placement setting; use one of {known}"
    return f"{where}: {err['msg']} (docs/placement.md)"


class ModelFacts(NamedTuple):
    """What an app's arguments say about its model (the checkpoint's config, no weights)."""

    model_dir: Any  # pathlib.Path of the checkpoint
    spec: Any  # offramp.ops.checkpoint.ModelSpec
    ranges: list  # layers [start, end) per stage
    exits: Any  # offramp.ops.exits config, None without exit heads


def model_facts(args: AppArgs) -> ModelFacts:
    """The checkpoint, its config, the stage split and the exit heads named by ``args``
    (the ingress, each stage and the placement controller read them the same way)."""
    from offramp.ops import exits as ex
    from offramp.ops.checkpoint import load_spec
    from offramp.ops.engine import resolve_model_dir
    from offramp.ops.partition import partition_layers

    model_dir = resolve_model_dir(args.model)
    spec = load_spec(model_dir)
    ranges = partition_layers(spec.num_layers, args.num_stages, args.split)
    exits = ex.load_exits_config(model_dir) if ex.exits_present(model_dir) else None
    return ModelFacts(model_dir, spec, ranges, exits)


# -- the applied Serve config, typed ------------------------------------------------------
Setting = Literal["num_replicas", "pool", "precision", "layers"]


class StageEntry(NamedTuple):
    """Stage ``k``'s deployment as an applied Serve config sets it."""

    name: str  # stage_name(k)
    replicas: int  # num_replicas; -1 when Serve autoscales it
    autoscaled: bool  # an autoscaling_config or num_replicas "auto": Serve, not placement, sizes it
    pool: str  # its pool_<name> resource, else the app's stages[k].pool, else "any"
    pool_pinned: bool  # the deployment names a pool_<name> resource itself (a pool move sets one)
    precision: str  # a precision move's env override, else stages[k].dtype, else "fp32"
    layers: tuple[int, int]  # a split move's env override, else the app's split


class ServeApp:
    """A typed view of one application of a Serve config (its dict: ``args``, ``deployments``),
    as ``serve deploy`` takes it and Serve reports it back: what the placement mover reads
    and edits. Edits return a new view; the dict it was built from is never changed.

    Where a stage's settings live: replicas in ``deployments[].num_replicas``; the pool as a
    ``pool_<name>`` custom resource in ``ray_actor_options.resources`` (else the app's
    ``args.stages[k].pool``); precision and layers as :data:`STAGE_DTYPE_ENV` /
    :data:`STAGE_LAYERS_ENV` in ``ray_actor_options.runtime_env.env_vars`` (else
    ``args.stages[k].dtype`` and the app's split, ``ranges``), read by each stage replica."""

    def __init__(self, config: dict | None, ranges: list | tuple = ()):
        self.config = config or {}
        self.ranges = [tuple(r) for r in ranges]

    def entry(self, name: str) -> dict:
        """The ``deployments:`` entry of ``name`` (an empty one when the config lists none)."""
        for d in self.config.get("deployments", []) or []:
            if d.get("name") == name:
                return d
        return {"name": name}

    def _arg(self, k: int, key: str, default: str) -> str:
        stages = (self.config.get("args") or {}).get("stages") or []
        return (stages[k] if k < len(stages) else {}).get(key, default)

    def stage(self, k: int) -> StageEntry:
        name = stage_name(k)
        e = self.entry(name)
        opts = e.get("ray_actor_options") or {}
        env = (opts.get("runtime_env") or {}).get("env_vars") or {}
        n = e.get("num_replicas", 1)
        replicas = 1 if n is None else n if isinstance(n, int) else -1
        layers = parse_layers(env[STAGE_LAYERS_ENV]) if env.get(STAGE_LAYERS_ENV) else \
            (self.ranges[k] if k < len(self.ranges) else (0, 0))  # (0, 0): a view built without the split
        pinned = pool_of(opts.get("resources") or {}, "")
        return StageEntry(name, replicas, bool(e.get("autoscaling_config")) or replicas < 0,
                          pinned or self._arg(k, "pool", "any"), bool(pinned),
                          env.get(STAGE_DTYPE_ENV) or self._arg(k, "dtype", "fp32"), tuple(layers))

    def stages(self) -> list[StageEntry]:
        """Every stage of the app's split (``ranges``)."""
        return [self.stage(k) for k in range(len(self.ranges))]

    def with_entry(self, entry: dict) -> "ServeApp":
        """This app with deployment ``entry["name"]`` replaced by (or given) ``entry``."""
        cfg = copy.deepcopy(self.config)
        deps = cfg.setdefault("deployments", [])
        for i, d in enumerate(deps):
            if d.get("name") == entry["name"]:
                deps[i] = copy.deepcopy(entry)
                break
        else:
            deps.append(copy.deepcopy(entry))
        return ServeApp(cfg, self.ranges)

    def with_setting(self, name: str, setting: Setting, value: Any, surge: bool = False) -> "ServeApp":
        """This app with one setting of deployment ``name`` changed (each a rolling update
        when applied); ``surge``: also ``max_surge_percent: 100`` (new replicas ready before
        old ones stop)."""
        if setting not in get_args(Setting):
            raise ValueError(f"setting {setting!r}: one of {', '.join(get_args(Setting))}")
        e = copy.deepcopy(self.entry(name))
        if surge:
            e["max_surge_percent"] = 100
        if setting == "num_replicas":
            e["num_replicas"] = value
            return self.with_entry(e)
        opts = e.setdefault("ray_actor_options", {})
        if setting == "pool":
            res = {k: v for k, v in (opts.get("resources") or {}).items() if not k.startswith("pool_")}
            opts["resources"] = {**res, f"pool_{value}": 1}
        else:  # precision, layers: env vars the stage replica reads at start
            renv = dict(opts.get("runtime_env") or {})
            var = STAGE_DTYPE_ENV if setting == "precision" else STAGE_LAYERS_ENV
            renv["env_vars"] = {**(renv.get("env_vars") or {}), var: str(value)}
            opts["runtime_env"] = renv
        return self.with_entry(e)

"""The Helm chart (helm/offramp): lint, render, CRD schema, Serve config, security, bad values.

Needs the real `helm` binary (CI installs it with .ci/install-helm.sh); skipped without it.
The KubeRay CRDs come from `<repo>/../shared/k8s`. Whole file: a few seconds.
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "offramp"
CRD_DIR = REPO.parent / "shared" / "k8s"
PRESETS = ["values.yaml", "values-cpu.yaml", "values-gpu-cpu.yaml", "values-autoscaling.yaml"]

pytestmark = pytest.mark.skipif(shutil.which("helm") is None, reason="helm not installed (run .ci/install-helm.sh)")


def _load_serve_config():
    """helm/serve_config.py (render + extract serveConfigV2), loaded from its file: with helm/
    on sys.path, the chart folder helm/offramp would shadow the installed offramp package."""
    spec = importlib.util.spec_from_file_location("serve_config", REPO / "helm" / "serve_config.py")
    module = sys.modules["serve_config"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sc = _load_serve_config()


def helm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["helm", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@functools.lru_cache(maxsize=None)
def _render_cached(values: tuple[str, ...], sets: tuple[str, ...]) -> list[dict]:
    return sc.render([CHART / v for v in values], list(sets))


def render(*values: str, sets: tuple[str, ...] = ()) -> list[dict]:
    return copy.deepcopy(_render_cached(tuple(values), tuple(sets)))


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def ray_pod_specs(rs: dict) -> dict[str, dict]:
    """group name ('head', 'gpu', 'cpu') -> pod spec."""
    rc = rs["spec"]["rayClusterConfig"]
    out = {"head": rc["headGroupSpec"]["template"]["spec"]}
    for g in rc.get("workerGroupSpecs") or []:
        out[g["groupName"]] = g["template"]["spec"]
    return out


# ---------------------------------------------------------------------------------------------
# lint / render
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", PRESETS)
def test_helm_lint(values):
    proc = helm("lint", str(CHART), "--strict", "-f", str(CHART / values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", PRESETS)
def test_template_renders_expected_objects(values):
    docs = render(values)
    by_kind = sorted(d["kind"] for d in docs)
    dashboards = ["ConfigMap"] if list((CHART / "dashboards").glob("*.json")) else []
    assert by_kind == sorted(["NetworkPolicy", "RayService", "Secret", "Service", *dashboards]), by_kind
    # No dashboard ConfigMap while the chart ships no dashboards/*.json.
    if not list((CHART / "dashboards").glob("*.json")):
        assert not kinds(docs, "ConfigMap")


# ---------------------------------------------------------------------------------------------
# The RayService against the KubeRay CRD
# ---------------------------------------------------------------------------------------------


def _strict(schema):
    """The CRD schema, but objects with listed properties reject unknown keys: the API server
    would silently prune them (a misspelt field is a silent no-op, not an error)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.lru_cache(maxsize=None)
def _crd_validator():
    jsonschema = pytest.importorskip("jsonschema")
    path = CRD_DIR / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD not found at {path} (the repo is cloned with shared/ beside it)")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("values", PRESETS)
def test_rayservice_matches_crd_schema(values):
    (rs,) = kinds(render(values), "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(_crd_validator().iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # KubeRay: the RayService name is at most 47 characters and a DNS-1035 label.
    assert len(rs["metadata"]["name"]) <= 47


def test_long_release_name_is_truncated_for_kuberay():
    (rs,) = kinds(sc.render([], [], release="a" * 53), "RayService")
    assert len(rs["metadata"]["name"]) <= 47


# ---------------------------------------------------------------------------------------------
# serveConfigV2: one source of truth with local `serve run`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", PRESETS)
def test_serve_config_is_valid_serve_and_app_args(values):
    from ray.serve.schema import ServeDeploySchema

    from offramp.deployments.config import AppArgs

    docs = render(values)
    config = sc.serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "offramp.deployments.app:build_app"
    args = AppArgs.model_validate(app["args"])

    values_doc = yaml.safe_load((CHART / values).read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    stages = values_doc.get("stages", defaults["stages"])
    assert args.num_stages == len(stages) == len(args.stages)
    assert [s.pool for s in args.stages] == [s["pool"] for s in stages]

    # Deployment names and pool placement through custom resources.
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"OfframpIngress", *(f"Stage{i}" for i in range(len(stages)))}
    gpus_per_pod = values_doc.get("gpuWorkers", {}).get("gpusPerPod", defaults["gpuWorkers"]["gpusPerPod"])
    for i, stage in enumerate(stages):
        opts = deps[f"Stage{i}"]["ray_actor_options"]
        assert opts["resources"] == {f"pool_{stage['pool']}": 1}
        assert ("num_gpus" in opts) == (stage["pool"] == "gpu" and gpus_per_pod > 0)
        dep = deps[f"Stage{i}"]
        assert dep["max_ongoing_requests"] >= args.stages[i].max_batch_size
        assert dep["max_queued_requests"] > 0
        assert ("autoscaling_config" in dep) != ("num_replicas" in dep)

    # The proxies: HTTP 8000 on all interfaces inside the pod, gRPC 9000 with the servicer.
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["grpc_options"]["port"] == 9000
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "offramp.api.proto.offramp_pb2_grpc.add_OfframpServicer_to_server"
    ]


def test_serve_config_values_flow_through(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny", "maxContext": 512},
                "exit": {"mode": "threshold", "threshold": 0.9, "kvFill": "propagate", "maxDraft": 3},
                "split": [3],
                "stages": [{"pool": "cpu"}, {"pool": "cpu", "numReplicas": 3, "dtype": "bf16", "compile": True}],
                "apiKey": {"envName": "MY_KEY"},
                "gpuWorkers": {"enabled": False},
                "otel": {"serveTracing": {"enabled": True}},
            }
        )
    )
    from ray.serve.schema import ServeDeploySchema

    from offramp.deployments.config import AppArgs

    config = sc.serve_config(sc.render([values]))
    ServeDeploySchema.model_validate(config)
    assert config["tracing_config"]["enabled"] is True
    app = config["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert (args.model_name, args.max_context, args.split, args.api_key_env) == ("tiny", 512, [3], "MY_KEY")
    assert (args.exit.mode, args.exit.threshold, args.exit.kv_fill) == ("threshold", 0.9, "propagate")
    assert args.exit.max_draft == 3
    assert args.stages[1].dtype == "bf16" and args.stages[1].max_batch_size == 16  # stageDefaults merged
    assert (args.stages[0].compile, args.stages[1].compile) == (False, True)
    stage1 = next(d for d in app["deployments"] if d["name"] == "Stage1")
    assert stage1["num_replicas"] == 3 and "num_gpus" not in stage1["ray_actor_options"]


def test_speculative_exit_renders():
    from offramp.deployments.config import AppArgs

    args = AppArgs.model_validate(sc.serve_config(render(sets=("exit.mode=speculative",)))["applications"][0]["args"])
    assert (args.exit.mode, args.exit.max_draft, args.exit.kv_fill) == ("speculative", 6, "exact")


def test_chain_forwarding_renders():
    from offramp.deployments.config import AppArgs

    def chain(*sets):
        return AppArgs.model_validate(sc.serve_config(render(sets=sets))["applications"][0]["args"]).chain_forwarding

    assert chain() is True
    assert chain("channel.chainForwarding=false") is False


def test_placement_controller_renders_into_app_args(tmp_path):
    """placement.enabled: the ingress gets ControllerConfig settings (AppArgs.placement)."""
    from offramp.deployments.config import AppArgs
    from offramp.placement.controller import ControllerConfig

    args = sc.serve_config(render())["applications"][0]["args"]
    assert "placement" not in args  # off by default: no controller unless asked
    values = tmp_path / "values.yaml"  # a file: `helm --set` passes 3.5 as a string
    values.write_text(yaml.safe_dump({"placement": {
        "enabled": True, "maxKnob": "pool", "tpotSloMs": 150, "dryRun": True, "intervalS": 5,
        "costPerReplicaHour": {"gpu": 3.5}, "sloHeadroom": 0.2}}))
    args = sc.serve_config(sc.render([values]))["applications"][0]["args"]
    assert args["placement"] == {"interval_s": 5, "max_knob": "pool", "tpot_slo_s": 0.15, "slo_headroom": 0.2,
                                 "target_utilisation": 0.75, "max_replicas_per_stage": 4,
                                 "policy": {"dry_run": True}, "cost_per_replica_hour": {"gpu": 3.5, "cpu": 0.25}}
    placement = AppArgs.model_validate(args).placement
    cfg = ControllerConfig.model_validate({**placement, "app": "offramp"})  # what the ingress starts
    assert (cfg.tpot_slo_s, cfg.policy.dry_run, cfg.cost_per_replica_hour) == (0.15, True, {"gpu": 3.5, "cpu": 0.25})
    assert cfg.slo_headroom == 0.2
    default = sc.serve_config(render(sets=("placement.enabled=true",)))["applications"][0]["args"]["placement"]
    assert default["tpot_slo_s"] is None and AppArgs.model_validate({"placement": default})


def test_serve_config_extracted_for_local_run(tmp_path):
    """helm/serve_config.py writes a file `serve run` accepts: the chart's config, loopback-bound."""
    out = tmp_path / "serve.yaml"
    rc = sc.main(["-f", str(CHART / "values-gpu-cpu.yaml"), "-o", str(out), "--local", "--strip-pool-resources"])
    assert rc == 0
    local = yaml.safe_load(out.read_text())
    chart = sc.serve_config(render("values-gpu-cpu.yaml"))
    assert local["http_options"]["host"] == "127.0.0.1"
    assert local["applications"][0]["args"] == chart["applications"][0]["args"]
    for dep in local["applications"][0]["deployments"]:
        assert "num_gpus" not in dep["ray_actor_options"] and "resources" not in dep["ray_actor_options"]
    # Without options: the verbatim serveConfigV2 text.
    verbatim = tmp_path / "verbatim.yaml"
    assert sc.main(["-f", str(CHART / "values-gpu-cpu.yaml"), "-o", str(verbatim)]) == 0
    assert verbatim.read_text() == sc.serve_config_text(render("values-gpu-cpu.yaml"))


def test_app_builder_importable():
    try:
        module = importlib.import_module("offramp.deployments.app")
    except ModuleNotFoundError as e:
        if e.name == "offramp.deployments.app":
            pytest.skip("offramp.deployments.app is not written yet (the chart's import_path target)")
        raise
    assert callable(getattr(module, "build_app"))


# ---------------------------------------------------------------------------------------------
# Ray cluster shape
# ---------------------------------------------------------------------------------------------


def test_cluster_groups_default():
    (rs,) = kinds(render("values.yaml"), "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # The dashboard listens on the pod IP only (Kubernetes expands $(POD_IP) from the env), and
    # the head's probes ask it there, not on localhost where KubeRay's defaults would look.
    assert head["rayStartParams"]["dashboard-host"] == "$(POD_IP)"
    (hc,) = head["template"]["spec"]["containers"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in hc["env"]
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = hc[probe]["exec"]["command"]
        assert "http://${POD_IP}:8265/api/gcs_healthz" in cmd[-1] and "localhost:8265" not in cmd[-1]
    # KubeRay rejects resources in both rayStartParams and the group `resources` field.
    assert "resources" not in head
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for pool, g in groups.items():
        assert g["resources"] == {f"pool_{pool}": "100"}
        assert g["labels"] == {"offramp.io/pool": pool}
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert not {"num-cpus", "num-gpus", "memory", "resources", "labels"} & set(g["rayStartParams"])
        assert g["template"]["metadata"]["labels"]["offramp.io/pool"] == pool
    gpu = groups["gpu"]["template"]["spec"]
    (c,) = gpu["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-gpu")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (c,) = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert rc["enableInTreeAutoscaling"] is False


def test_cluster_groups_presets():
    (rs,) = kinds(render("values-cpu.yaml"), "RayService")
    assert [g["groupName"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["cpu"]
    (rs,) = kinds(render("values-gpu-cpu.yaml"), "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert [s["pool"] for s in config["applications"][0]["args"]["stages"]] == ["gpu", "gpu", "cpu", "cpu"]
    (rs,) = kinds(render("values-autoscaling.yaml"), "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    # Only the head (autoscaler sidecar) gets a service account token.
    specs = ray_pod_specs(rs)
    assert specs["head"]["automountServiceAccountToken"] is True
    assert specs["gpu"]["automountServiceAccountToken"] is specs["cpu"]["automountServiceAccountToken"] is False
    deps = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert all("autoscaling_config" in d for d in deps)


def test_gpu_pool_without_real_gpus():
    (rs,) = kinds(render(sets=("gpuWorkers.gpusPerPod=0",)), "RayService")
    gpu = ray_pod_specs(rs)["gpu"]["containers"][0]
    assert "nvidia.com/gpu" not in gpu["resources"].get("limits", {})
    stage0 = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"][1]
    assert stage0["name"] == "Stage0" and "num_gpus" not in stage0["ray_actor_options"]


# ---------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", PRESETS)
def test_pod_security_restricted(values):
    docs = render(values)
    (rs,) = kinds(docs, "RayService")
    for group, spec in ray_pod_specs(rs).items():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, group
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", group
        assert spec["enableServiceLinks"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sec = c["securityContext"]
            assert sec["runAsNonRoot"] is True, (group, c["name"])
            assert sec["allowPrivilegeEscalation"] is False, (group, c["name"])
            assert sec["capabilities"]["drop"] == ["ALL"] and "add" not in sec["capabilities"], (group, c["name"])
            assert sec["seccompProfile"]["type"] == "RuntimeDefault", (group, c["name"])
            assert sec["readOnlyRootFilesystem"] is True, (group, c["name"])
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert {"/tmp", "/tmp/ray", "/dev/shm"} <= set(mounts), (group, c["name"])
            assert all("emptyDir" in v for v in mounts.values())
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
            # KubeRay's autoscaler sidecar mounts the volume named ray-logs at /tmp/ray.
            assert c["volumeMounts"][[m["mountPath"] for m in c["volumeMounts"]].index("/tmp/ray")]["name"] == "ray-logs"
            # API key from the Secret on every Ray container.
            env = {e["name"]: e for e in c["env"]}
            ref = env["OFFRAMP_API_KEY"]["valueFrom"]["secretKeyRef"]
            (secret,) = kinds(docs, "Secret")
            assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
            assert secret["data"]["api-key"]
            assert env["OTEL_SERVICE_NAME"]["value"] == "offramp"
            assert "OTEL_TRACES_SAMPLER_ARG" in env


def test_channel_tls_secret_is_mounted_and_wired():
    from offramp.deployments.config import AppArgs

    plain = render()
    assert AppArgs.model_validate(sc.serve_config(plain)["applications"][0]["args"]).channel_tls is None
    docs = render(sets=("channel.tls.secretName=offramp-channel-tls",))
    (rs,) = kinds(docs, "RayService")
    for group, spec in ray_pod_specs(rs).items():
        (vol,) = [v for v in spec["volumes"] if v["name"] == "channel-tls"]
        assert vol["secret"]["secretName"] == "offramp-channel-tls", group
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "channel-tls"]
        assert mount["readOnly"] and mount["mountPath"] == "/etc/offramp/channel-tls", group
    tls = AppArgs.model_validate(sc.serve_config(docs)["applications"][0]["args"]).channel_tls
    assert (tls.cert_file, tls.key_file, tls.ca_file) == tuple(
        f"/etc/offramp/channel-tls/{k}" for k in ("tls.crt", "tls.key", "ca.crt"))


def test_existing_api_key_secret():
    docs = render(sets=("apiKey.existingSecret=my-key", "apiKey.secretKey=token", "apiKey.envName=MY_KEY"))
    assert not kinds(docs, "Secret")
    (rs,) = kinds(docs, "RayService")
    for spec in ray_pod_specs(rs).values():
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["MY_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "my-key", "key": "token"}


def test_secret_template_reuses_live_key():
    """The generated key is kept across upgrades: the template reads the live Secret via lookup."""
    text = (CHART / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret"' in text and "helm.sh/resource-policy: keep" in text


def _ports(rule):
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("values", PRESETS)
def test_network_policy(values):
    docs = render(values)
    (np,) = kinds(docs, "NetworkPolicy")
    spec = np["spec"]
    release_sel = {"app.kubernetes.io/name": "offramp", "app.kubernetes.io/instance": "offramp"}
    assert spec["podSelector"] == {"matchLabels": release_sel}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    # Every pod of the release is covered by the policy's selector.
    (rs,) = kinds(docs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for t in templates:
        assert release_sel.items() <= t["metadata"]["labels"].items()

    intra = {"podSelector": {"matchLabels": release_sel}}
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    for rule in spec["ingress"]:
        assert rule.get("from"), f"ingress rule open to every source: {rule}"
        if rule["from"] == [intra]:
            assert "ports" not in rule  # Ray-internal: all ports
            continue
        # Nobody but the release and the operator reaches the dashboard / jobs API / Ray client.
        if rule["from"] != [operator]:
            assert not _ports(rule) & {8265, 10001, 6379, 52365}, rule
    api = [r for r in spec["ingress"] if _ports(r) == {8000, 9000}]
    assert api and api[0]["from"] == [{"podSelector": {}}]
    assert any(r["from"] == [operator] and 8265 in _ports(r) for r in spec["ingress"])
    assert any(_ports(r) == {8080} for r in spec["ingress"])  # metrics scraping

    egress = spec["egress"]
    assert {"to": [intra]} in egress
    dns = [r for r in egress if _ports(r) == {53}]
    assert dns and {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
    for rule in egress:
        assert rule.get("to") or rule.get("ports"), f"egress rule open to everything: {rule}"


def test_network_policy_configurable():
    sets = (
        "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=web",
        "otel.endpoint=http://collector.obs:4317",
        "otel.collector.to[0].namespaceSelector.matchLabels.name=obs",
    )
    docs = render(sets=sets)
    (np,) = kinds(docs, "NetworkPolicy")
    api = [r for r in np["spec"]["ingress"] if _ports(r) == {8000, 9000}]
    assert api[0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    otlp = [r for r in np["spec"]["egress"] if _ports(r) == {4317}]
    assert otlp and otlp[0]["to"] == [{"namespaceSelector": {"matchLabels": {"name": "obs"}}}]
    (rs,) = kinds(docs, "RayService")
    env = {e["name"]: e.get("value") for e in rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.obs:4317"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert not kinds(render(sets=("networkPolicy.enabled=false",)), "NetworkPolicy")


@pytest.mark.parametrize("values", PRESETS)
def test_services_and_ports(values):
    docs = render(values)
    (svc,) = kinds(docs, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert (ports["http"]["port"], ports["http"]["targetPort"]) == (8000, "serve")
    assert (ports["grpc"]["port"], ports["grpc"]["targetPort"]) == (9000, "grpc")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"]["ray.io/serve"] == "true"
    (rs,) = kinds(docs, "RayService")
    for group, spec in ray_pod_specs(rs).items():
        cports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert cports["serve"] == 8000 and cports["grpc"] == 9000, group
    # No Service of the chart ever exposes the dashboard, jobs or Ray client ports.
    for s in kinds(docs, "Service"):
        assert not {p["port"] for p in s["spec"]["ports"]} & {8265, 10001, 6379, 52365}
    assert "serviceType" not in rs["spec"]["rayClusterConfig"]["headGroupSpec"]  # head svc stays ClusterIP
    assert "enableIngress" not in rs["spec"]["rayClusterConfig"]["headGroupSpec"]


# ---------------------------------------------------------------------------------------------
# Observability extras
# ---------------------------------------------------------------------------------------------


def test_service_monitor():
    docs = render(sets=("metrics.serviceMonitor.enabled=true",))
    (sm,) = kinds(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    metrics_svc = next(s for s in kinds(docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert metrics_svc["spec"]["ports"][0]["port"] == 8080


def test_grafana_dashboard_configmap_when_file_exists(tmp_path):
    chart = tmp_path / "offramp"
    shutil.copytree(CHART, chart)
    (chart / "dashboards").mkdir(exist_ok=True)
    (chart / "dashboards" / "offramp.json").write_text('{"title": "Offramp"}')
    docs = sc.render([], [], chart=chart)
    (cm,) = kinds(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(cm["data"]["offramp.json"]) == {"title": "Offramp"}


# ---------------------------------------------------------------------------------------------
# Bad values fail at helm template/install with a message naming the field
# ---------------------------------------------------------------------------------------------

BAD_VALUES = {
    "wrong_type": ("stages:\n  - pool: cpu\n    numReplicas: two\n", "stages/0/numReplicas"),
    "unknown_key": ("gpuWorkers:\n  enabeld: true\n", "enabeld"),
    "unknown_top_key": ("stagez: []\n", "stagez"),
    "negative_replicas": ("cpuWorkers:\n  replicas: -1\n", "cpuWorkers/replicas"),
    "negative_stage_replicas": ("stages:\n  - pool: cpu\n    numReplicas: -2\n", "stages/0/numReplicas"),
    "bad_pool": ("stages:\n  - pool: tpu\n", "stages/0/pool"),
    "bad_dtype": ("stages:\n  - pool: cpu\n    dtype: int4\n", "stages/0/dtype"),
    "no_stages": ("stages: []\n", "stages"),
    "sampling_above_one": ("otel:\n  samplingRatio: 1.5\n", "otel/samplingRatio"),
    "bad_port": ("serve:\n  httpPort: 70000\n", "serve/httpPort"),
    "chain_forwarding_not_a_bool": ("channel:\n  chainForwarding: sometimes\n", "channel/chainForwarding"),
    # Cross-field checks done by the templates (fail with a message naming both values).
    "split_mismatch": ("split: [2, 4]\n", "split has 2 entries but stages has 2"),
    "gpu_stage_without_gpu_workers": ("gpuWorkers:\n  enabled: false\n", "stages[0].pool is \"gpu\" but gpuWorkers.enabled is false"),
    "threshold_without_value": ("exit:\n  mode: threshold\n", "exit.threshold"),
    "speculative_with_propagate": ("exit:\n  mode: speculative\n  kvFill: propagate\n",
                                   "exit.mode is \"speculative\" but exit.kvFill is \"propagate\""),
    "max_draft_above_limit": ("exit:\n  maxDraft: 33\n", "exit/maxDraft"),
    "bad_exit_mode": ("exit:\n  mode: sometimes\n", "exit/mode"),
    "bad_max_knob": ("placement:\n  maxKnob: everything\n", "placement/maxKnob"),
    "negative_replica_cost": ("placement:\n  costPerReplicaHour:\n    gpu: -1\n", "placement/costPerReplicaHour/gpu"),
    "headroom_of_the_whole_slo": ("placement:\n  sloHeadroom: 1\n", "placement/sloHeadroom"),
    "min_above_max": ("cpuWorkers:\n  minReplicas: 5\n", "cpuWorkers.minReplicas=5"),
    "managed_ray_start_param": ("cpuWorkers:\n  rayStartParams:\n    num-cpus: \"8\"\n", "cpuWorkers.rayStartParams.num-cpus"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_rejected(case, tmp_path):
    text, needle = BAD_VALUES[case]
    bad = tmp_path / f"{case}.yaml"
    bad.write_text(text)
    proc = helm("template", "offramp", str(CHART), "-f", str(bad))
    assert proc.returncode != 0, f"{case} was accepted:\n{proc.stdout[:2000]}"
    assert needle in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: check the instructions it parses into)
# ---------------------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def test_dockerfile_instructions():
    ins = _dockerfile_instructions(REPO / "Dockerfile")
    ops = [op for op, _ in ins]
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "USER", "WORKDIR", "LABEL", "EXPOSE", "CMD", "ENTRYPOINT", "HEALTHCHECK", "SHELL"}
    assert set(ops) <= known, set(ops) - known
    assert ops[0] in {"ARG", "FROM"}
    froms = [rest for op, rest in ins if op == "FROM"]
    # Two Ray bases (CPU, CUDA) and a final stage chosen by the VARIANT build-arg.
    assert [f for f in froms if f.startswith("rayproject/ray:${RAY_VERSION}-")] and froms[-1] == "base-${VARIANT}"
    global_args = [rest for op, rest in ins[: ops.index("FROM")] if op == "ARG"]
    assert "RAY_VERSION=2.60.0" in global_args and "VARIANT=cpu" in global_args
    final = ins[len(ins) - 1 - ops[::-1].index("FROM") :]
    assert ("ARG", "RAY_VERSION") in final  # re-declared where it is used
    # Ends as a non-root user; installs the package (embedded model included) with pip.
    user = [rest for op, rest in final if op == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert "pip install --no-cache-dir ." in runs and "torch==" in runs
    envs = " ".join(rest for op, rest in ins if op == "ENV")
    assert "download.pytorch.org/whl/cpu" in envs
    assert not any(op == "ADD" for op in ops)
    copied = " ".join(rest for op, rest in final if op == "COPY")
    assert "offramp" in copied and "pyproject.toml" in copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored) and "offramp" not in ignored


def test_haproxy_mode_is_an_opt_in_for_every_ray_container():
    def env_of(docs) -> dict[str, set[str]]:
        (rs,) = kinds(docs, "RayService")
        return {group: {e["name"] for c in spec["containers"] for e in c.get("env", [])}
                for group, spec in ray_pod_specs(rs).items()}

    assert all("RAY_SERVE_ENABLE_HA_PROXY" not in names for names in env_of(render("values.yaml")).values())
    on = env_of(render("values.yaml", sets=("serve.haproxy=true",)))
    assert set(on) == {"head", "gpu", "cpu"}  # the controller (head) and the replicas read it
    assert all("RAY_SERVE_ENABLE_HA_PROXY" in names for names in on.values())

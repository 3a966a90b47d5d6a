"""The placement controller run from the Serve config (``AppArgs.placement``; Helm's
``placement:`` values render into it, tests/test_helm.py): the args validate against
``ControllerConfig`` with messages that name the fix, and the ingress starts the controller
as the app's named detached actor without waiting for it or failing when it cannot.

Unit tests with a fake ``rayops``: a real start needs a Ray cluster and a config-deployed app
(the integration tests' session app would then get a controller racing their own moves).
"""
from __future__ import annotations

import inspect
import logging

import pytest

from offramp.deployments import app as app_module
from offramp.deployments.config import AppArgs
from offramp.placement.controller import ControllerActor, ControllerConfig, controller_name

PLACEMENT = {"interval_s": 5, "max_knob": "pool", "tpot_slo_s": 0.15, "policy": {"dry_run": True},
             "cost_per_replica_hour": {"gpu": 3.0, "cpu": 0.5}}


def test_app_args_take_controller_settings():
    args = AppArgs.model_validate({"placement": PLACEMENT})
    assert args.placement == PLACEMENT
    assert AppArgs.model_validate(args.model_dump(mode="json")) == args  # what build_app binds
    assert AppArgs().placement is None  # default: no controller from the config


@pytest.mark.parametrize("placement, needle", [
    ({"max_knob": "everything"}, "placement.max_knob: Input should be 'replicas', 'pool', 'precision' or 'split'"),
    ({"interval": 5}, "placement.interval is not a placement setting; use one of interval_s,"),
    ({"tpot_slo_s": -1}, "placement.tpot_slo_s: Input should be greater than 0"),
    ({"cost_per_replica_hour": {"gpu": -1}}, "cost_per_replica_hour {'gpu': -1.0}: a replica-hour costs"),
    ({"app": "other"}, "placement.app is set; remove it"),
])
def test_bad_placement_names_the_fix(placement, needle):
    with pytest.raises(ValueError, match="placement") as e:
        AppArgs.model_validate({"placement": placement})
    assert needle in str(e.value), str(e.value)


class _FakeRef:
    def remote(self, *args):
        return None


class _FakeRegistry:
    def __getattr__(self, name):
        return _FakeRef()


class _FakeHeartbeat:
    def __init__(self, app_name, replica, beat, name):
        self.replica = replica

    def stop(self):
        pass


@pytest.fixture
def ingress(monkeypatch, tiny_model_dir):
    """Build the ingress class as written (``serve.ingress`` wraps it in a subclass with an
    async ``__init__``) with a fake ``rayops``; returns (build(args), start_detached calls)."""
    ops = app_module.rayops
    started = []
    monkeypatch.setattr(ops, "replica_context", lambda: ("myapp", "replica-1"))
    monkeypatch.setattr(ops, "registry", lambda app: _FakeRegistry())
    monkeypatch.setattr(ops, "channel_token", lambda app: "token")
    monkeypatch.setattr(ops, "http_host", lambda: "127.0.0.1")
    monkeypatch.setattr(ops, "grpc_serving", lambda: False)
    monkeypatch.setattr(ops, "Heartbeat", _FakeHeartbeat)
    monkeypatch.setattr(ops, "start_detached", lambda cls, name, *a, **kw: started.append((cls, name, *a)))
    cls = next(c for c in app_module.OfframpIngress.func_or_class.__mro__
               if "__init__" in vars(c) and not inspect.iscoroutinefunction(vars(c)["__init__"]))

    def build(**args):
        obj = object.__new__(cls)
        cls.__init__(obj, {"model": str(tiny_model_dir), "num_stages": 2, "api_key_env": "", **args})
        return obj

    return build, started


def test_ingress_starts_the_named_controller(ingress):
    build, started = ingress
    build()
    assert started == []  # no placement args: no controller
    build(placement=PLACEMENT)
    ((cls, name, config),) = started
    # the name `offramp placement status|stop --app myapp` looks up; the app is the ingress's own
    assert (cls, name) == (ControllerActor, controller_name("myapp"))
    cfg = ControllerConfig.model_validate(config)
    assert (cfg.app, cfg.interval_s, cfg.max_knob, cfg.policy.dry_run) == ("myapp", 5, "pool", True)
    assert cfg.cost_per_replica_hour == {"gpu": 3.0, "cpu": 0.5}


def test_ingress_serves_when_the_controller_cannot_start(ingress, monkeypatch, caplog):
    build, _ = ingress

    def refuse(*args, **kwargs):
        raise RuntimeError("GCS unreachable")

    monkeypatch.setattr(app_module.rayops, "start_detached", refuse)
    with caplog.at_level(logging.WARNING, logger="offramp"):
        assert build(placement=PLACEMENT).frontend is not None
    assert "placement controller of app 'myapp' not started (RuntimeError: GCS unreachable)" in caplog.text

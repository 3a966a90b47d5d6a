"""Ray cluster plumbing: the one wrapper around Ray calls (``rayops``), local multi-node
clusters (``local``) and the ``offramp cluster`` CLI. This module holds only the pool
naming rule every layer shares, so importing it pulls in nothing."""


def pool_of(resources: dict, default: str) -> str:
    """The pool named by a ``pool_<name>`` custom resource among ``resources`` (how a
    deployment is placed on a pool), else ``default``."""
    return next((k.removeprefix("pool_") for k in sorted(resources) if k.startswith("pool_")), default)

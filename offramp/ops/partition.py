"""Which layers each pipeline stage owns: one pure function, golden-tested.

Stage ``i`` owns the half-open layer range ``[start, end)``. The embedding rides on the
first stage and the final norm + LM head on the last, so when layers do not divide
evenly the extra layers go to the inner stages first (1, 2, …), then to stage 0, then
to the last stage.
"""
from __future__ import annotations

from offramp.errors import ConfigError

LayerRange = tuple[int, int]


def partition_layers(
    num_layers: int, num_stages: int | None = None, split: list[int] | None = None
) -> list[LayerRange]:
    """Layer ranges per stage, from either a stage count or explicit split points.

    ``split`` lists the layer indices at which a new stage starts, e.g. ``[4, 8]`` on a
    12-layer model gives ``[(0, 4), (4, 8), (8, 12)]``.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"the model has num_layers={num_layers!r}; expected a positive integer")
    if split is not None:
        split = [int(s) for s in split]
        if num_stages is not None and num_stages != len(split) + 1:
            raise ConfigError(
                f"num_stages={num_stages} but split={split} makes {len(split) + 1} stages; give only one"
            )
        if any(b <= a for a, b in zip(split, split[1:])):
            raise ConfigError(f"split points {split} must be strictly increasing, e.g. 4,8")
        bad = [s for s in split if not 0 < s < num_layers]
        if bad:
            raise ConfigError(
                f"split points {bad} out of range: each must be between 1 and {num_layers - 1} "
                f"for a {num_layers}-layer model"
            )
        edges = [0, *split, num_layers]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    n = 1 if num_stages is None else num_stages
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_stages={n!r}; expected a positive integer")
    if n > num_layers:
        raise ConfigError(
            f"num_stages={n} is more than the model's {num_layers} layers; use at most {num_layers} stages"
        )
    sizes = [num_layers // n] * n
    order = list(range(1, n - 1)) + [0] + ([n - 1] if n > 1 else [])
    for i in order[: num_layers % n]:
        sizes[i] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges

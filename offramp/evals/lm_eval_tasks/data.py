"""Datasets of the shipped lm-eval tasks, made here from the held-out half of Offramp's
arithmetic (``offramp.training.data``: the same hash split ``offramp prepare-data`` uses,
so none of these problems was trained on). lm-eval loads them through ``custom_dataset``.

* ``offramp_arith_mc`` (multiple choice, scored by loglikelihood): ``47+25=`` with the
  right result and three near misses (±1, +10), in a fixed shuffled order.
* ``offramp_arith_gen`` (generate until a newline): ``47+25=`` -> ``72``.
"""
from __future__ import annotations

import random


def problems(limit: int | None = None) -> list[tuple[str, int]]:
    """Held-out two-digit sums and differences as (expression, result), in a fixed order."""
    from offramp.training.data import DataSpec, is_heldout, math_units

    spec = DataSpec()
    out = [(key, int(line.split("=")[-1])) for key, line, level in math_units(spec)
           if level == "two_digit" and is_heldout("math:" + key, spec.seed, spec.heldout_frac)]
    random.Random(0).shuffle(out)
    return out[:limit] if limit else out


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_):
    rows = []
    for i, (expr, result) in enumerate(problems()):
        choices = [result, result + 1, result - 1, result + 10]
        order = list(range(4))
        random.Random(i).shuffle(order)
        rows.append({"question": f"{expr}=", "choices": [str(choices[j]) for j in order], "label": order.index(0)})
    return _dataset(rows)


def generation(**_):
    return _dataset([{"question": f"{expr}=", "answer": str(result)} for expr, result in problems()])

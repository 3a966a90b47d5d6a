"""Draft thresholds for speed (offramp calibrate-draft): the round replay and the choice."""
from __future__ import annotations

import math

import torch

from offramp.training.draft import DraftSpec, choose, simulate


def test_replay_counts_rounds_drafts_and_work():
    conf = torch.ones(1, 10)
    agree = torch.ones(1, 10, dtype=torch.bool)
    r = simulate(conf, agree, 0.5, max_draft=3, layers=2, num_layers=4, layer_cost=1.0, head_cost=0.0, visit=0.0)
    # rounds from 0 (3 drafts, all kept), 4 (3), 8 (the window's end leaves room for 1)
    assert (r["rounds"], r["tokens"], r["drafted"], r["accepted"]) == (3, 10, 7, 7)
    assert r["work"] == (4 * 2 + 2) + (4 * 2 + 2) + (2 * 2 + 2)
    agree[0, 1] = False  # the second draft of the first round is rejected
    r = simulate(conf, agree, 0.5, 3, 2, 4, 1.0, 0.0, 0.0)
    assert r["tokens"] == 10 and r["accepted"] < r["drafted"]
    none = simulate(conf, agree, 2.0, 3, 2, 4, 1.0, 0.0, 0.0)  # nothing confident: plain decoding
    assert none["rounds"] == 10 and none["drafted"] == 0


def test_the_choice_follows_what_agrees_and_prefers_forced_drafts_when_all_agree():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(8, 64, generator=g)
    agree = conf > 0.6  # confident drafts agree, the rest do not
    spec = DraftSpec(max_draft=4, visit_overhead=0.5)
    best = choose(conf, agree, 2, 8, 1.0, 1.0, spec)
    assert 0.5 < best["threshold"] < 0.75
    forced = simulate(conf, agree, -math.inf, 4, 2, 8, 1.0, 1.0, 0.5 * 9)
    assert best["tokens"] / best["work"] > forced["tokens"] / forced["work"]
    assert best["speedup"] > 1
    every = choose(conf, torch.ones_like(agree), 2, 8, 1.0, 1.0, spec)
    assert every["threshold"] == -math.inf and every["mean_accepted"] > 3

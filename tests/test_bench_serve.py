"""``offramp bench serve``: its statistics, prompts and ratio targets, the engine's
``on_step`` hook it times tokens with, and one smoke run of the real command."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offramp.bench import serve as bs
from offramp.bench.common import percentile

# ----------------------------------------------------------------------------- statistics


def test_percentile_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 0.5) == 3.0
    assert percentile(xs, 0.99) == 5.0
    assert percentile(xs, 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0  # lower middle of an even count
    assert percentile(list(range(1, 201)), 0.99) == 198
    assert percentile([float("nan"), 2.0, None], 0.5) == 2.0  # non-finite values are skipped
    assert math.isnan(percentile([], 0.5))


def test_request_stats_ttft_tpot_and_failures():
    r = bs.request_stats(10.0, [10.5, 10.6, 10.8, 11.1], expected=4)
    assert r["error"] is None and r["n"] == 4
    assert r["ttft"] == pytest.approx(0.5)
    assert r["tpot"] == pytest.approx(0.2)  # (11.1 - 10.5) / 3
    one = bs.request_stats(0.0, [0.3])
    assert one["ttft"] == pytest.approx(0.3) and math.isnan(one["tpot"]) and one["error"] is None
    assert bs.request_stats(0.0, [])["error"] == "no tokens"
    assert "expected 4" in bs.request_stats(0.0, [1.0, 2.0], expected=4)["error"]
    assert bs.request_stats(0.0, [1.0], error="HTTP 500")["error"] == "HTTP 500"


def test_summarize_pools_requests_and_takes_median_wave_rate():
    def req(ttft, tpot, n=4, error=None):
        return {"ttft": ttft, "tpot": tpot, "n": n, "error": error}

    waves = [bs.Wave(1.0, [req(0.1, 0.01), req(0.2, 0.02)]),  # 8 tokens/s
             bs.Wave(2.0, [req(0.3, 0.03), req(0.4, 0.04, error="boom")]),  # 4 tokens (the failed one not counted)
             bs.Wave(0.5, [req(0.5, 0.05), req(0.6, 0.06)])]  # 16 tokens/s
    s = bs.summarize(waves)
    assert s["requests"] == 6 and s["failed"] == 1 and s["errors"] == ["boom"]
    assert s["tokens_per_s_waves"] == [8.0, 2.0, 16.0] and s["tokens_per_s"] == 8.0
    assert s["ttft_ms_p50"] == pytest.approx(300.0)  # over the 5 successful requests
    assert s["ttft_ms_p99"] == pytest.approx(600.0)
    assert s["tpot_ms_p50"] == pytest.approx(30.0)
    assert bs.summarize(waves, tpot_measured=False)["tpot_ms_p50"] is None


# ----------------------------------------------------------------------------- prompts


def _docs():
    return ([{"task": "math", "text": "m" * 50}, {"task": "math", "text": "n" * 50}]
            + [{"task": "coding", "text": "c" * 17}]
            + [{"task": "qa", "text": "q" * 100}])


def test_build_prompts_round_robin_over_tasks_exact_length():
    encode = lambda text: [ord(ch) for ch in text]  # noqa: E731 - one token per character
    prompts = bs.build_prompts(_docs(), encode, 9, 8)
    assert [t for t, _ in prompts[:3]] == ["qa", "math", "coding"]
    assert all(len(p) == 8 for _, p in prompts)
    # coding has 17 characters: two windows, then it runs out and the others go on
    assert [t for t, _ in prompts].count("coding") == 2
    assert [t for t, _ in prompts] == ["qa", "math", "coding", "qa", "math", "coding", "qa", "math", "qa"]
    assert {p[0] for t, p in prompts if t == "math"} == {ord("m")}  # windows of the first doc come first
    with pytest.raises(ValueError, match="only"):
        bs.build_prompts(_docs(), encode, 100, 8)


def test_build_prompts_from_the_heldout_split_mixes_every_task():
    from offramp.api.text import load_tokenizer
    from offramp.ops.engine import resolve_model_dir
    from offramp.training.data import DataSpec, build_corpus

    tok = load_tokenizer(resolve_model_dir(None))
    prompts = bs.build_prompts(build_corpus(DataSpec(), None)[1],
                               lambda t: tok.encode(t, add_special_tokens=True, verbose=False), 16, 32)
    assert len(prompts) == 16 and all(len(p) == 32 for _, p in prompts)
    assert {t for t, _ in prompts[:4]} == {"qa", "math", "coding"}  # the concurrency-1 wave too
    assert all(0 <= i < len(tok) for _, p in prompts for i in p)


# ----------------------------------------------------------------------------- ratios


def _summary(**over):
    s = {"served": {"c1": {"tpot_ms_p50": 12.0, "tokens_per_s": 80.0, "stage_calls_per_token": 2.0},
                    "c16": {"tokens_per_s": 300.0}},
         "served_calibrated": {"c1": {"tpot_ms_p50": 10.0}, "c16": {"tokens_per_s": 330.0}},
         "served_1stage": {"c16": {"tokens_per_s": 400.0}},
         "in_process": {"c1": {"tpot_ms_p50": 10.0}, "c16": {"tokens_per_s": 600.0}},
         "transformers": {"c16": {"tokens_per_s": 1000.0}},
         "plain_serve": {"c16": {"tokens_per_s": 500.0}}}
    s.update(over)
    return s


def test_ratios_values_targets_and_met():
    r = bs.ratios(_summary(), 16)
    assert r["served_tpot_c1_vs_in_process"] == {"value": 1.2, "target": "<= 1.5", "met": True}
    assert r["served_tokens_per_s_c16_vs_in_process"] == {"value": 0.5, "target": ">= 0.6", "met": False}
    assert r["served_1stage_c16_vs_plain_serve"] == {"value": 0.8, "target": ">= 1", "met": False}
    assert r["served_c16_vs_transformers_batched"] == {"value": 0.3, "target": None, "met": None}
    assert r["overhead_per_stage_call_ms"] == {"value": 1.0, "target": "<= 0.5", "met": False}  # (12-10)/2
    assert r["calibrated_vs_off_tokens_per_s_c16"]["value"] == pytest.approx(1.1)
    assert r["calibrated_vs_off_tpot_c1"] == {"value": 1.2, "target": ">= 1", "met": True}  # 12/10: faster


def test_ratios_of_compiled_contenders():
    s = _summary(served_compiled={"c1": {"tpot_ms_p50": 8.0}, "c16": {"tokens_per_s": 450.0}},
                 in_process_compiled={"c1": {"tpot_ms_p50": 5.0}, "c16": {"tokens_per_s": 900.0}})
    r = bs.ratios(s, 16)
    assert r["served_compiled_vs_eager_tpot_c1"]["value"] == 1.5  # eager 12 ms / compiled 8 ms
    assert r["in_process_compiled_vs_eager_tpot_c1"]["value"] == 2.0  # 10 / 5
    assert r["served_compiled_vs_eager_tokens_per_s_c16"]["value"] == 1.5  # 450 / 300
    assert r["served_compiled_tpot_c1_vs_in_process_compiled"] == {"value": 1.6, "target": "<= 1.5", "met": False}
    assert r["served_compiled_tokens_per_s_c16_vs_in_process_compiled"]["value"] == 0.5
    assert not any("compiled" in k for k in bs.ratios(_summary(), 16))  # without --compile: no such ratio


def test_ratios_of_chain_forwarding():
    s = _summary(served_unchained={"c1": {"tpot_ms_p50": 15.0}, "c16": {"tokens_per_s": 240.0}})
    r = bs.ratios(s, 16)
    assert r["chained_vs_unchained_tpot_c1"] == {"value": 1.25, "target": ">= 1", "met": True}  # 15 / 12
    assert r["chained_vs_unchained_tokens_per_s_c16"] == {"value": 1.25, "target": ">= 1", "met": True}  # 300 / 240
    assert not any("chained" in k for k in bs.ratios(_summary(), 16))  # without --unchained: no such ratio


def test_ratios_leave_out_skipped_contenders_and_fail_missing_values():
    s = _summary()
    del s["plain_serve"], s["transformers"]
    r = bs.ratios(s, 16)
    assert "served_1stage_c16_vs_plain_serve" not in r and "served_c16_vs_transformers_batched" not in r
    s = _summary(in_process={"c1": {"tpot_ms_p50": None}, "c16": {"tokens_per_s": 0.0}})
    r = bs.ratios(s, 16)
    assert r["served_tpot_c1_vs_in_process"] == {"value": None, "target": "<= 1.5", "met": False}
    assert r["served_tokens_per_s_c16_vs_in_process"]["met"] is False  # division by zero: no value


def test_evaluate():
    assert bs.evaluate(1.0, ">= 1") is True
    assert bs.evaluate(0.99, ">= 1") is False
    assert bs.evaluate(0.5, "<= 0.5") is True
    assert bs.evaluate(float("nan"), "<= 0.5") is False
    assert bs.evaluate(None, ">= 1") is False
    assert bs.evaluate(3.0, None) is None
    with pytest.raises(ValueError):
        bs.evaluate(1.0, "== 1")


def test_help_names_every_contender():
    from offramp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    serve = next(a for a in sub._actions if a.dest == "bench").choices["serve"]
    text = serve.format_help()
    for name in bs.CONTENDERS:
        assert name in text
    args = parser.parse_args(["bench", "serve"])
    assert (args.stages, args.concurrency, args.requests, args.prompt_tokens, args.max_tokens, args.repeats,
            args.tracing, args.no_plain, args.no_transformers) == (2, 16, None, 32, 64, 3, False, False, False)


# ----------------------------------------------------------------------------- timed generation


def test_generate_on_step_is_called_once_per_decode_step(tiny_model_dir):
    from offramp.ops.engine import StagedModel
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    model = StagedModel(tiny_model_dir, num_stages=2, max_slots=4)
    made = []
    new_sequence = model.new_sequence
    model.new_sequence = lambda *a, **k: made.append(new_sequence(*a, **k)) or made[-1]
    seen: list[list[int]] = []
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    seqs = model.generate([[5, 6, 7], [8, 9]], sp, ExitPolicy("off"),
                          on_step=lambda: seen.append([len(s.generated) for s in made]))
    assert seen == [[k, k] for k in range(1, 6)]  # once per step, after that step's tokens were appended
    plain = model.generate([[5, 6, 7], [8, 9]], sp, ExitPolicy("off"))
    assert [s.generated for s in seqs] == [s.generated for s in plain]  # the hook changes nothing


def test_in_process_and_transformers_waves_time_every_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from offramp.ops.engine import StagedModel

    prompts = [("qa", [5, 6, 7, 8]), ("math", [9, 10, 11]), ("coding", [12, 13, 14, 15])]
    w = bs._in_process_wave(StagedModel(tiny_model_dir, num_stages=2, max_slots=2), prompts, 2, 6)
    assert [r["n"] for r in w.requests] == [6, 6, 6] and all(r["error"] is None for r in w.requests)
    assert all(0 < r["ttft"] <= w.wall and r["tpot"] > 0 for r in w.requests)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    stamps, made = bs.hf_generate(hf, [p for _, p in prompts], 6, bs._hf_pad_id(hf))  # ragged: left padding
    assert made == 6 and len(stamps) == 6 and stamps == sorted(stamps)
    w = bs._transformers_wave(hf, prompts, 2, 6)
    assert w.tokens == 18 and all(r["error"] is None for r in w.requests)


# ----------------------------------------------------------------------------- smoke


@pytest.mark.integration
@pytest.mark.timeout(360)
def test_bench_serve_smoke_json():
    """The real command at a tiny size: every contender answers, nothing fails, ratios are finite."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "offramp.cli", "bench", "serve", "--json", "--repeats", "1", "--concurrency", "2",
           "--requests", "2", "--max-tokens", "4", "--prompt-tokens", "8", "--stages", "2", "--unchained"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert set(report["contenders"]) == set(bs.CONTENDERS) - set(bs.COMPILED)  # those come with --compile
    assert report["proxy"] == "haproxy"
    for name, d in report["contenders"].items():
        for c in ("c1", "c2"):
            assert d[c]["failed"] == 0, (name, c, d[c]["errors"])
            assert d[c]["requests"] == 2 and d[c]["tokens_per_s"] > 0, (name, c)
    for name in ("served", "served_unchained"):  # chained or not, every token visits both stages
        assert report["contenders"][name]["c1"]["stage_calls_per_token"] == pytest.approx(2.0), name
    for c in ("c1", "c2"):  # every plain Serve request ran in a batch the replica reported
        assert [sum(w) for w in report["contenders"]["plain_serve"][c]["batch_sizes_per_wave"]] == [2]
    assert set(report["ratios"]) >= {"served_tpot_c1_vs_in_process", "served_tokens_per_s_c2_vs_in_process",
                                     "served_1stage_c2_vs_plain_serve", "served_c2_vs_transformers_batched",
                                     "overhead_per_stage_call_ms", "calibrated_vs_off_tokens_per_s_c2",
                                     "calibrated_vs_off_tpot_c1", "chained_vs_unchained_tpot_c1",
                                     "chained_vs_unchained_tokens_per_s_c2"}
    for k, v in report["ratios"].items():
        assert v["value"] is not None and math.isfinite(v["value"]), k
    print(f"bench serve smoke: {time.monotonic() - t0:.0f} s")


def test_config_args_are_the_offramp_apps_of_a_serve_config(tmp_path):
    from offramp.deployments.config import AppArgs

    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n- name: other\n  import_path: x.y:z\n- name: offramp\n"
                    "  import_path: offramp.deployments.app:build_app\n"
                    "  args: {num_stages: 3, chain_forwarding: false, stages: [{compile: true}]}\n")
    got = bs._config_app_args(str(path), None, AppArgs)
    assert got.num_stages == 3 and not got.chain_forwarding and got.stages[0].compile and got.model is None
    assert bs._config_app_args(str(path), "/m", AppArgs).model == "/m"  # --model replaces the file's
    local = bs._config_app_args(str(Path(__file__).parent.parent / "configs" / "local.yaml"), None, AppArgs)
    assert local.num_stages == 2 and local.exit.gate_max_active == 4
    path.write_text("applications:\n- name: other\n  import_path: x.y:z\n")
    with pytest.raises(ValueError, match="no application with import_path offramp.deployments.app:build_app"):
        bs._config_app_args(str(path), None, AppArgs)
    path.write_text("applications:\n- import_path: offramp.deployments.app:build_app\n  args: {num_stages: 0}\n")
    with pytest.raises(ValueError, match="(?s)its Offramp args are invalid.*num_stages"):
        bs._config_app_args(str(path), None, AppArgs)
    with pytest.raises(ValueError, match="cannot read it as YAML"):
        bs._config_app_args(str(tmp_path / "missing.yaml"), None, AppArgs)


def test_stages_that_disagree_with_the_config_are_refused_before_anything_starts():
    local = str(Path(__file__).parent.parent / "configs" / "local.yaml")
    p = subprocess.run([sys.executable, "-m", "offramp.cli", "bench", "serve", "--config", local, "--stages", "4",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--stages 4 and --config" in p.stderr and "drop --stages" in p.stderr, p.stderr


def test_bench_serve_runs_the_app_a_serve_config_describes(tmp_path):
    """--config: the served apps are the file's (here three stages, not --stages' default
    two), and the report says which file and whether the in-process peer compiled."""
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n- name: offramp\n  import_path: offramp.deployments.app:build_app\n"
                    "  args: {num_stages: 3, chain_forwarding: false}\n")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "offramp.cli", "bench", "serve", "--json", "--repeats", "1", "--concurrency", "2",
           "--requests", "2", "--max-tokens", "4", "--prompt-tokens", "8", "--no-plain", "--no-transformers",
           "--config", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert report["config"] == str(path) and report["stages"] == 3 and report["in_process_compiled"] is False
    for name in ("served", "served_calibrated", "served_1stage"):
        for c in ("c1", "c2"):
            assert report["contenders"][name][c]["failed"] == 0, (name, c)
    assert report["contenders"]["served"]["c1"]["stage_calls_per_token"] == pytest.approx(3.0)
    assert report["contenders"]["served_1stage"]["c1"]["stage_calls_per_token"] == pytest.approx(1.0)

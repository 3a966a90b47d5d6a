"""Log-probabilities against transformers on tiny random checkpoints (Llama, Qwen2, GPT-2).

* exits off: each generated token's logprob and its top alternatives equal
  ``log_softmax`` of transformers' logits at that position (teacher-forced on the output);
* prompt logprobs (echo): the prompt's tokens scored by a full-depth prefill, equal to
  transformers over the prompt;
* exits at a gate: the logprob comes from the exit head that chose the token,
  ``lm_head(exit_norm(h_L))`` on transformers' hidden state after layer L;
* speculative: the full model's, whatever was drafted, so equal to exits off;
* the same through the HTTP API (in-process backend) with the ``openai`` client: the
  completions and chat shapes, echo, streaming, and bad values refused with the field named.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from offramp.ops.engine import InProcessBackend, StagedModel
from offramp.ops.sampling import token_logprobs
from offramp.ops.worker import ExitPolicy
from offramp.protocol import GenerationRequest, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60]]
TOP = 4


@pytest.fixture
def checkpoint(family_checkpoint):
    return family_checkpoint


@pytest.fixture
def hf(family_hf):
    return family_hf


def reference(hf, ids: list[int], layer: int | None = None, head=None) -> torch.Tensor:
    """log_softmax over every position of ``ids``: the full model's, or (``layer``) the
    exit head's on transformers' hidden state after that layer."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=layer is not None)
        logits = out.logits[0] if layer is None else head(out.hidden_states[layer][0])
    return torch.log_softmax(logits.float(), -1)


def assert_logprobs_match(got, ref_rows: torch.Tensor, tokens: list[int], top: int = TOP):
    assert len(got) == len(tokens) == ref_rows.shape[0]
    for lp, row, tok in zip(got, ref_rows, tokens):
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert len(lp.top) == top
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        for t, v in lp.top:  # the right values for the ids given, and no larger value left out
            assert v == pytest.approx(float(row[t]), abs=1e-4)
        if top:
            assert vals[-1] >= float(row.topk(top).values[-1]) - 1e-4


@pytest.mark.parametrize("stages", [1, 2])
def test_generated_logprobs_equal_transformers(checkpoint, hf, stages):
    model = StagedModel(checkpoint, num_stages=stages)
    sp = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=TOP)
    for s in model.generate(PROMPTS, sp, ExitPolicy("off")):
        ref = reference(hf, s.tokens)[s.prompt_len - 1: -1]  # position i predicts token i + 1
        assert_logprobs_match(s.logprobs, ref, s.generated)
        assert all(lp.top[0][0] == t for lp, t in zip(s.logprobs, s.generated)), "greedy picks the top token"


def test_sampled_tokens_report_the_raw_distribution(checkpoint, hf):
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=8, temperature=1.5, top_k=5, seed=3, ignore_eos=True, logprobs=0)
    (s,) = model.generate(PROMPTS[:1], sp, ExitPolicy("off"))
    ref = reference(hf, s.tokens)[s.prompt_len - 1: -1]
    assert_logprobs_match(s.logprobs, ref, s.generated, top=0)


@pytest.mark.parametrize("mode", ["off", "calibrated", 0.0, "speculative"])
def test_prompt_logprobs_are_the_full_models(checkpoint, hf, mode):
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=2)
    seqs = model.generate(PROMPTS, sp, ExitPolicy.from_request(mode, None))
    for s in seqs:
        assert s.prompt_logprobs[0] is None
        ref = reference(hf, s.tokens[: s.prompt_len])[:-1]
        assert_logprobs_match(s.prompt_logprobs[1:], ref, s.tokens[1: s.prompt_len], top=2)
    if mode == 0.0:  # the prompt went to full depth; the tokens after it may exit
        assert any(st == 0 for s in seqs for st in s.exit_stages)


def test_exited_tokens_report_the_exit_heads_logprobs(checkpoint, hf):
    model = StagedModel(checkpoint, num_stages=2)
    stage0 = model.workers[0].stage
    assert stage0.has_exit
    sp = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=TOP)
    exited = 0
    for s in model.generate(PROMPTS, sp, ExitPolicy("threshold", 0.0)):
        L = model.workers[0].end_layer
        ex_ref = reference(hf, s.tokens, layer=L, head=lambda h: stage0.exit_logits(h))[s.prompt_len - 1: -1]
        full_ref = reference(hf, s.tokens)[s.prompt_len - 1: -1]
        for i, (lp, stage, tok) in enumerate(zip(s.logprobs, s.exit_stages, s.generated)):
            ref = ex_ref if stage == 0 else full_ref
            assert_logprobs_match([lp], ref[i: i + 1], [tok])
            exited += stage == 0
    assert exited > 0, "threshold 0 must exit at stage 0"


def test_speculative_logprobs_are_the_full_models(checkpoint):
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=TOP)
    off = model.generate(PROMPTS, sp, ExitPolicy("off"))
    spec = model.generate(PROMPTS, sp, ExitPolicy("speculative", 0.0, max_draft=4))
    assert sum(s.drafted for s in spec) > 0
    for a, b in zip(off, spec):
        assert a.generated == b.generated
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_backend_events_carry_logprobs_and_prompt_logprobs(checkpoint, hf):
    backend = InProcessBackend(StagedModel(checkpoint, num_stages=2))
    prompt = PROMPTS[0]
    req = GenerationRequest("r", tuple(prompt), SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1,
                                                               prompt_logprobs=1), exit_mode="off")

    async def run():
        return [ev async for ev in backend.generate(req)]

    events = asyncio.run(run())
    assert len(events) == 4 and all(ev.logprob is not None for ev in events)
    assert events[0].prompt_logprobs is not None and all(ev.prompt_logprobs is None for ev in events[1:])
    ref = reference(hf, list(prompt))[:-1]
    assert_logprobs_match(events[0].prompt_logprobs[1:], ref, prompt[1:], top=1)


def test_token_logprobs_reports_minus_infinity_as_a_finite_number():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    (lp,) = token_logprobs(logits, [1], 3)
    assert lp.logprob == -9999.0 and lp.top[-1] == (1, -9999.0)


# --------------------------------------------------------------------------- over HTTP

MODEL = "tiny-lp"


@pytest.fixture(scope="module")
def http(tiny_model_dir):
    import openai

    from offramp.api.app import create_app
    from offramp.api.frontend import ApiSettings, Frontend
    from offramp.api.text import load_tokenizer
    from test_api_helpers import LiveServer

    staged = StagedModel(tiny_model_dir, num_stages=2)
    tok = load_tokenizer(tiny_model_dir)
    settings = ApiSettings(model_name=MODEL, max_context=staged.max_seq, request_timeout_s=30.0)
    app = create_app(Frontend(backend=InProcessBackend(staged), tokenizer=tok, settings=settings))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with LiveServer(app) as server:
        yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0), tok, hf


def test_completions_logprobs_and_echo_over_http(http):
    server, client, tok, hf = http
    prompt = [5, 6, 7, 8, 9]
    r = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=4, temperature=0, logprobs=2, echo=True,
                                  extra_body={"ignore_eos": True, "offramp": {"exit": "off"}})
    choice = r.choices[0]
    generated = choice.model_extra["offramp"]["token_ids"]
    ids = prompt + generated
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(hf, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert choice.text.startswith(tok.decode(prompt))
    assert lp.text_offset == sorted(lp.text_offset)
    assert choice.model_extra["offramp"]["logprob_stages"] == [1] * len(generated)


def test_lm_eval_loglikelihood_request_shape(http):
    """What lm-eval's local-completions sends for a loglikelihood request: token ids, echo,
    max_tokens 1, logprobs 1; it sums token_logprobs[ctxlen:-1] and checks greediness."""
    server, client, tok, hf = http
    ctx, cont = [5, 6, 7, 8], [9, 10]
    r = client.completions.create(model=MODEL, prompt=[ctx + cont], max_tokens=1, temperature=0, logprobs=1,
                                  echo=True, seed=1234)
    lp = r.choices[0].logprobs
    ref = reference(hf, ctx + cont)
    want = sum(float(ref[i - 1, t]) for i, t in enumerate(ctx + cont) if i >= len(ctx))
    assert sum(lp.token_logprobs[len(ctx):-1]) == pytest.approx(want, abs=1e-3)


def test_chat_logprobs_streamed_and_not(http):
    server, client, tok, hf = http
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content), "greedy"
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = []
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                             top_logprobs=3, stream=True, extra_body={"ignore_eos": True}):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_streamed_completion_echo_leads_with_the_prompt(http):
    server, client, tok, hf = http
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0, echo=True,
                                            logprobs=0, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith("abc")
    first = next(c for c in chunks if c.choices)
    n_prompt = len(tok.encode("abc"))
    assert first.choices[0].logprobs.token_logprobs[0] is None
    assert len(first.choices[0].logprobs.tokens) >= n_prompt


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_logprob_values_name_the_field(http, body, param):
    import httpx

    server = http[0]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_best_of_returns_the_choices_with_the_highest_mean_logprob(http):
    server, client, tok, hf = http
    kw = dict(model=MODEL, prompt=[[5, 6, 7, 8]], max_tokens=6, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True, "offramp": {"exit": "off"}})
    every = client.completions.create(n=4, logprobs=0, **kw)  # the same candidates: seeds 11..14
    means = sorted(((sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs), c.text)
                    for c in every.choices), reverse=True)
    assert len({t for _, t in means}) > 1, "the candidates must differ for the test to mean anything"
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [t for _, t in means[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all candidates count


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "n": 3, "best_of": 2},
    {"prompt": "hi", "best_of": 2, "stream": True},
    {"prompt": "hi", "best_of": 99},
])
def test_bad_best_of_names_the_field(http, body):
    import httpx

    r = httpx.post(http[0].url + "/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "best_of"

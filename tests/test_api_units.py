"""Pure pieces of the HTTP front end: bind check, key parsing, detokenizer, stop matcher,
chat rendering, settings. No server, no Ray."""
from __future__ import annotations

import asyncio

import pytest

from offramp.api.auth import check_bind, check_exposure, key_matches, presented_key
from offramp.api.frontend import ApiSettings, Frontend
from offramp.api.generation import Generation
from offramp.api.text import (FALLBACK_STOP, IncrementalDetokenizer, StopMatcher, encode_chat,
                              load_tokenizer, render_fallback_chat)
from offramp.deployments.config import AppArgs
from offramp.errors import BadRequest, ConfigError
from offramp.protocol import SamplingParams

from test_api_helpers import FakeBackend, build_tokenizer, byte_tokens


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    with_tpl = load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("a"), chat_template=True))
    without = load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("b"), chat_template=False))
    return with_tpl, without


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"])
def test_loopback_bind_without_key_is_fine(host):
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "example.internal"])
def test_public_bind_needs_a_key(host):
    with pytest.raises(ConfigError, match="OFFRAMP_API_KEY"):
        check_bind(host, None)
    with pytest.raises(ConfigError, match="MY_KEY"):
        check_bind(host, "", key_env="MY_KEY")
    check_bind(host, "sk-123")


def test_serve_grpc_needs_a_key_even_with_a_loopback_http_host():
    check_exposure("127.0.0.1", False, None)  # serve run configs/local.yaml: HTTP on loopback, no gRPC
    check_exposure(None, None, None)  # unreadable: left to the operator
    with pytest.raises(ConfigError, match="gRPC proxy.*OFFRAMP_API_KEY"):
        check_exposure("127.0.0.1", True, None)  # Serve's gRPC proxy binds [::] whatever the HTTP host
    with pytest.raises(ConfigError, match="'0.0.0.0'"):
        check_exposure("0.0.0.0", False, None)
    check_exposure("0.0.0.0", True, "sk-1")


def test_presented_key_sources():
    assert presented_key([(b"authorization", b"Bearer sk-1")]) == b"sk-1"
    assert presented_key([(b"authorization", b"bearer  sk-1 ")]) == b"sk-1"
    assert presented_key([(b"x-api-key", b"sk-2")]) == b"sk-2"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([]) is None
    assert key_matches(b"sk-1", b"sk-1") and not key_matches(b"sk-1x", b"sk-1") and not key_matches(None, b"k")


def test_detokenizer_matches_full_decode_and_never_emits_partial_chars(tokenizers):
    tok = tokenizers[0]
    text = "naive café 🙂 漢字 the quick brown fox"
    for ids in (tok.encode(text, add_special_tokens=False), byte_tokens(tok, text)):
        d = IncrementalDetokenizer(tok, tok.encode("hi there", add_special_tokens=False))
        pieces = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_flushes_incomplete_tail(tokenizers):
    tok = tokenizers[0]
    d = IncrementalDetokenizer(tok, [])
    ids = byte_tokens(tok, "a🙂")[:-1]  # emoji cut short
    assert "".join(d.add(i) for i in ids) == "a"
    assert d.flush() == "\ufffd"


@pytest.mark.parametrize("chunks,stops,out,stopped,kept", [
    (["hello wor", "ld STOP more"], ["STOP"], "hello world ", True, ()),
    (["abc S", "T", "OP"], ["STOP"], "abc ", True, ()),
    (["a", "b", "c"], ["xyz"], "abc", False, ()),
    (["one two"], ["two", "one"], "", True, ()),  # earliest match wins
    (["no stops"], [], "no stops", False, ()),
    # include_stop_str_in_output: a kept stop string ends the text
    (["hello wor", "ld STOP more"], ["STOP"], "hello world STOP", True, ("STOP",)),
    (["abc S", "T", "OP x"], ["STOP"], "abc STOP", True, ("STOP",)),
    (["one two"], ["two", "one"], "one", True, ("two", "one")),
    (["ab"], ["ab", "a"], "ab", True, ("ab", "a")),  # same position: the first in the list
    (["x <|u|> y"], ["y", "<|u|>"], "x ", True, ("y",)),  # an implicit stop (not kept) still cuts
])
def test_stop_matcher(chunks, stops, out, stopped, kept):
    m = StopMatcher(stops, kept)
    emitted, hit = [], False
    for c in chunks:
        text, hit = m.feed(c)
        emitted.append(text)
        if hit:
            break
    if not hit:
        emitted.append(m.flush())
    assert ("".join(emitted), hit) == (out, stopped)


def test_chat_template_and_fallback(tokenizers):
    with_tpl, without = tokenizers
    ids, stops = encode_chat(with_tpl, [("user", "hi")])
    assert with_tpl.decode(ids) == "<|user|>hi\n<|assistant|>" and stops == []
    ids, stops = encode_chat(without, [("system", "be brief"), ("user", "hi")])
    assert without.decode(ids) == "system: be brief\nuser: hi\nassistant:" == render_fallback_chat(
        [("system", "be brief"), ("user", "hi")])
    assert stops == [FALLBACK_STOP]


def test_chat_template_error_is_bad_request(tokenizers, tmp_path):
    tok = tokenizers[0]
    tok2 = type(tok).from_pretrained(str(build_tokenizer(tmp_path)))
    tok2.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(BadRequest, match="roles must alternate"):
        encode_chat(tok2, [("user", "hi")])


def test_frontend_from_app_args_reads_key_once(tokenizers):
    args = AppArgs(model_name="m", max_context=128, max_tokens_cap=500, api_key_env="K")
    fe = Frontend.from_app_args(args, FakeBackend(tokens=[1]), tokenizers[0], model_context=2048, environ={"K": "s"})
    s = fe.settings
    assert (s.model_name, s.max_context, s.max_tokens_cap, s.api_key.get_secret_value()) == ("m", 128, 127, "s")
    fe = Frontend.from_app_args(AppArgs(), FakeBackend(tokens=[1]), tokenizers[0], model_context=256, environ={})
    assert fe.settings.api_key is None and fe.settings.max_context == 256
    assert fe.stop_token_ids() == (tokenizers[0].eos_token_id,)
    assert "s" not in repr(ApiSettings(max_context=64, api_key="s").api_key)


def test_generation_close_before_start_closes_backend(tokenizers):
    """A request abandoned before its first token still closes every backend iterator."""
    backend = FakeBackend(tokens=[5, 6])

    async def main():
        gen = Generation(backend, tokenizers[0], request_id="r", prompt_ids=[1], n=2,
                         sampling=SamplingParams(max_tokens=4), stops=[], exit_mode="off", task=None, timeout_s=5)
        await gen.start()
        await gen.aclose()

    asyncio.run(main())
    assert sorted(backend.outcomes) == ["r-0", "r-1"]
    assert all(o.closed and o.emitted == 1 for o in backend.outcomes.values())


class VerifyingBackend:
    """Plays rounds of (drafted, accepted): each round emits accepted + 1 tokens, the first with ``verified``."""

    num_stages = 2

    def __init__(self, rounds: list[tuple[int, int]]):
        self.rounds = rounds
        self.requests = []

    async def generate(self, request):
        from offramp.protocol import TokenEvent

        self.requests.append(request)
        events = [TokenEvent(7, 1, None, (d, a) if i == 0 else None)
                  for d, a in self.rounds for i in range(a + 1)]
        for k, ev in enumerate(events):
            yield TokenEvent(ev.token_id, ev.exit_stage, "length" if k == len(events) - 1 else None, ev.verified)


def test_generation_sums_verify_rounds_per_choice(tokenizers):
    backend = VerifyingBackend([(0, 0), (4, 4), (4, 1), (2, 0)])  # 1 + 5 + 2 + 1 = 9 tokens

    async def run(exit_mode, n, max_draft=None):
        gen = Generation(backend, tokenizers[0], request_id="r", prompt_ids=[1], n=n, max_draft=max_draft,
                         sampling=SamplingParams(max_tokens=9), stops=[], exit_mode=exit_mode, task=None, timeout_s=5)
        try:
            await gen.start()
            results = await gen.collect()
        finally:
            await gen.aclose()
        return gen, results

    gen, results = asyncio.run(run("speculative", 2, max_draft=4))
    assert [r.max_draft for r in backend.requests] == [4, 4]
    one = {"drafted": 10, "accepted": 5, "verify_rounds": 4, "mean_accepted": 1.25, "deep_visits_per_token": 0.4444}
    assert [gen.speculative([r]) for r in results] == [one, one]
    assert gen.speculative(results) == {**one, "drafted": 20, "accepted": 10, "verify_rounds": 8}
    # A server whose default is speculative runs a 'calibrated' request speculative: counted too.
    gen, results = asyncio.run(run("calibrated", 1))
    assert gen.speculative(results) == one
    # Nothing verified and not asked for: no block. Asked for but nothing verified: zeros.
    backend.rounds = []
    gen, results = asyncio.run(run("off", 1))
    assert gen.speculative(results) is None
    gen, results = asyncio.run(run("speculative", 1))
    assert gen.speculative(results)["verify_rounds"] == 0 and gen.speculative(results)["mean_accepted"] == 0.0


def test_exit_args_speculative():
    from pydantic import ValidationError

    from offramp.deployments.config import ExitArgs
    from offramp.ops import worker

    assert ExitArgs().max_draft == worker.DEFAULT_MAX_DRAFT
    args = ExitArgs(mode="speculative", max_draft=12)
    assert (args.mode, args.max_draft, args.kv_fill) == ("speculative", 12, "exact")
    ExitArgs(mode="speculative", max_draft=worker.MAX_DRAFT_LIMIT)
    for bad in (0, worker.MAX_DRAFT_LIMIT + 1):
        with pytest.raises(ValidationError, match="max_draft"):
            ExitArgs(mode="speculative", max_draft=bad)
    with pytest.raises(ValidationError, match="exit.mode is 'speculative' but exit.kv_fill is 'propagate'.*"
                                              "set exit.kv_fill to 'exact'"):
        ExitArgs(mode="speculative", kv_fill="propagate")
    ExitArgs(mode="calibrated", kv_fill="propagate")  # fine without speculative


def test_exit_mode_off_written_bare_in_yaml_means_off():
    """YAML 1.1 reads ``mode: off`` as false; the Serve config still means exits off."""
    import yaml

    from offramp.deployments.config import AppArgs, ExitArgs

    assert ExitArgs.model_validate(yaml.safe_load("mode: off")).mode == "off"
    assert AppArgs.model_validate(yaml.safe_load("exit:\n  mode: off")).exit.mode == "off"
    with pytest.raises(ValueError, match="quote it"):
        ExitArgs.model_validate(yaml.safe_load("mode: on"))

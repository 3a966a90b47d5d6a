"""The contract between front ends (HTTP, gRPC, CLI) and a generation backend.

A backend is anything with ``async def generate(request) -> AsyncIterator[TokenEvent]``:
the in-process staged engine (:mod:`offramp.ops.engine`) and the Ray Serve pipeline
(:mod:`offramp.deployments`) both are. Front ends tokenize, validate, detokenize and
apply stop strings; a backend only sees token ids. Closing the iterator early cancels
the request and frees its KV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol, Union

ExitMode = Union[Literal["off", "calibrated", "speculative"], float]
# The smallest positive temperature: (logits - max) / T stays finite in float32 for any
# T >= this (1e-300 is a float32 zero). The API refuses (0, MIN_TEMPERATURE); the sampler
# treats anything below it as greedy.
MIN_TEMPERATURE = 1e-2
FinishReason = Literal["stop", "length"]
# Speculative exits: tokens drafted per deep-stage visit when a request does not say, and
# the most a request may ask for (the API, the Serve config and the stages share them).
DEFAULT_MAX_DRAFT = 6
MAX_DRAFT_LIMIT = 32


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the top token's probability
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # backend stops *after* emitting one of these
    ignore_eos: bool = False
    # Log-probabilities: None = not asked; k >= 0 = each generated token's own logprob plus
    # the k most likely alternatives. ``prompt_logprobs`` likewise for the prompt's tokens
    # (a full-depth prefill: no gate exits and no drafting on the first step).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Logit adjustments, applied wherever a token is chosen (exit heads, the last stage,
    # the drafter and the speculative verifier), in vLLM's order: logit_bias, min_tokens,
    # then the repetition (prompt + output), frequency and presence (output) penalties.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # stop_token_ids (EOS included) are masked until this many tokens

    @property
    def adjusts_logits(self) -> bool:
        """Whether token choice needs the sequence's history (rows then carry it)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


# Most alternatives per token a request may ask for (OpenAI's top_logprobs cap).
MAX_TOP_LOGPROBS = 20
# -inf (a token the model rules out) as a finite number: JSON has no infinities (vLLM's choice).
NEG_INF_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the chosen token's, and the ``top`` alternatives
    as (token id, logprob), most likely first. Always of the raw distribution of the head
    that chose the token (before temperature, top-k and top-p, as vLLM reports them)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def wire(self) -> list:
        return [self.logprob, [[t, lp] for t, lp in self.top]]

    @staticmethod
    def from_wire(w) -> "TokenLogprob":
        return TokenLogprob(float(w[0]), tuple((int(t), float(lp)) for t, lp in w[1]))


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    exit_mode: ExitMode = "calibrated"  # "off", "calibrated", "speculative" or a confidence threshold in [0, 1]
    max_draft: int | None = None  # "speculative": most tokens drafted per deep visit (None: the server's)
    task: str | None = None  # gate task type: "qa", "math", "coding"
    trace_context: dict[str, str] | None = None  # W3C carrier (traceparent, tracestate)
    deadline_s: float | None = None  # seconds from submission; None = backend default


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    exit_stage: int  # stage after which this token left; num_stages-1 = full depth
    finish_reason: FinishReason | None = None  # set on the last event of a request
    # Speculative exits: on the first token of each verify round (one deep-stage visit),
    # (drafted, accepted) of that round; the round committed ``accepted + 1`` tokens.
    verified: tuple[int, int] | None = None
    logprob: TokenLogprob | None = None  # sampling.logprobs asked: from the head that chose the token
    # sampling.prompt_logprobs asked, on the first event: one per prompt token (None for the
    # first, which nothing predicts), from the full model.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass
class DraftCounts:
    """Speculative exits, counted over verify rounds (``TokenEvent.verified``): tokens
    drafted, drafts accepted, and rounds, i.e. deep-stage visits, each committing its
    accepted drafts + 1 token. One request's, one ingress's or one benchmark's."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1

    def __iadd__(self, other: "DraftCounts") -> "DraftCounts":
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.rounds += other.rounds
        return self

    def report(self, tokens: int | None = None) -> dict:
        """As the API's ``offramp.speculative`` block; ``deep_visits_per_token`` when the
        generated ``tokens`` are known."""
        out = {"drafted": self.drafted, "accepted": self.accepted, "verify_rounds": self.rounds,
               "mean_accepted": round(self.accepted / self.rounds, 4) if self.rounds else 0.0}
        if tokens is not None:
            out["deep_visits_per_token"] = round(self.rounds / tokens, 4) if tokens else 0.0
        return out


class Backend(Protocol):
    num_stages: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    async def readiness(self) -> str | None:
        """None when a request can be served now, else what is missing (``GET /health``)."""
        ...


def stops(sampling: SamplingParams, token: int, eos_token_ids: tuple[int, ...]) -> bool:
    """Whether ``token`` ends the sequence as a stop (a stop token id, or eos unless ignored)."""
    return token in sampling.stop_token_ids or (not sampling.ignore_eos and token in eos_token_ids)


def finish_reason(sampling: SamplingParams, token: int, generated: int, total: int,
                  eos_token_ids: tuple[int, ...], max_seq: int) -> FinishReason | None:
    """Why a sequence stops after emitting ``token`` (its ``generated``-th), or None."""
    if stops(sampling, token, eos_token_ids):
        return "stop"
    if generated >= sampling.max_tokens or total >= max_seq:
        return "length"
    return None

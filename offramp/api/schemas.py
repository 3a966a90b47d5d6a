"""Request schemas of the OpenAI-compatible HTTP API (gRPC builds the same models), and
the limits that depend on settings. (The front-end/backend contract is :mod:`offramp.protocol`.)

Validation is strict: unknown fields, wrong JSON types (``"0.5"`` for a number, ``true``
for an integer) and non-finite numbers are rejected with a 400 that names the field.
OpenAI fields Offramp does not implement (tools, suffix, ...) are accepted
only at their "off" value, so a client never silently gets something it did not ask for;
the same holds for the vLLM extensions Offramp does not implement
(``skip_special_tokens=false``, ...). Fields without effect on the output (``metadata``,
``store``, ``service_tier``, ``user``) are accepted and ignored.

Sampling parameters are held to ranges the sampler cannot overflow on: ``temperature`` is
0 (greedy) or within [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`] (a tiny positive
temperature such as 1e-300 rounds to a float32 zero in the sampler, and ``(logits - max) / 0``
is NaN), integers that reach the backend fit in int32 (``top_k``, ``max_tokens``, ``n``) or
int63 (``seed``).

Limits that depend on the deployment (context, ``max_tokens`` cap, ``n`` cap, stop list
caps) are checked by :func:`check_limits` after tokenization, since they need the prompt
length.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import StrictInt, StrictStr

from offramp.errors import BadRequest
from offramp.protocol import MAX_DRAFT_LIMIT, MAX_TOP_LOGPROBS, MIN_TEMPERATURE, SamplingParams

TaskName = Literal["qa", "math", "coding"]

MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_LOGIT_BIAS = 300  # entries (OpenAI's cap)
MAX_REPETITION_PENALTY = 10.0
INT32_MAX = 2**31 - 1
INT63_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OfframpRequestExtras(_Strict):
    """Offramp's namespaced request field ``offramp``."""

    exit: Union[Literal["off", "calibrated", "speculative"], float] = Field(
        "calibrated",
        description="'off' = full depth for every token, 'calibrated' = the server's default policy, "
        "'speculative' = the first stage drafts with its exit head and the deep stages verify each draft in "
        "one visit (greedy output equals 'off'), or a confidence threshold in [0, 1] used at every gate "
        "(lower = more exits).",
    )
    max_draft: StrictInt | None = Field(
        None, description=f"exit 'speculative' only: most tokens drafted per deep visit, 1..{MAX_DRAFT_LIMIT} "
        "(None = the server's exit.max_draft).")
    task: TaskName | None = Field(None, description="Task hint for the exit gates.")

    @field_validator("exit")
    @classmethod
    def _exit_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"offramp.exit threshold must be within [0, 1], got {v}")
        return v

    @field_validator("max_draft")
    @classmethod
    def _max_draft_range(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_DRAFT_LIMIT:
            got = v if abs(v) < 10**9 else f"a {len(str(abs(v)))}-digit number"
            raise BadRequestValue("offramp.max_draft", f"max_draft must be 1..{MAX_DRAFT_LIMIT}, got {got}")
        return v

    @model_validator(mode="after")
    def _max_draft_needs_speculative(self):
        if self.max_draft is not None and self.exit != "speculative":
            raise BadRequestValue("offramp.max_draft", f"max_draft applies only to exit 'speculative' (exit is "
                                  f"{self.exit!r}); set offramp.exit to 'speculative' or omit max_draft")
        return self


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` before [DONE].")
    continuous_usage_stats: bool = Field(
        False, description="vLLM extension: every chunk carries `usage` so far (prompt, completion, total).")


class SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: StrictStr = Field(description="Must equal the served model name (see GET /v1/models).")
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX, description="Most tokens to generate.")
    temperature: float = Field(1.0, description="0 = greedy, else within [0.01, 2].")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="In (0, 1]; a tiny top_p keeps only the top token.")
    top_k: StrictInt = Field(-1, ge=-1, le=INT32_MAX, description="-1 or 0 = off.")
    n: StrictInt = Field(1, ge=1, le=INT32_MAX, description="Choices per request; each is its own backend request.")
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, description="Stop strings; not included in the output.")
    seed: StrictInt | None = Field(None, ge=0, le=INT63_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, max_length=256, description="Accepted and ignored (logged nowhere).")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence.")
    offramp: OfframpRequestExtras = Field(default_factory=OfframpRequestExtras)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="-2..2: subtracted from the logit "
                                           "of every token already in the output.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="-2..2: subtracted once per "
                                            "occurrence in the output.")
    logit_bias: dict[StrictStr, float] | None = Field(None, max_length=MAX_LOGIT_BIAS, description="token id (as "
                                                      "a string) -> bias in [-100, 100], added to its logit.")
    # vLLM extensions. stop_token_ids is honoured; the rest are accepted at the value that
    # is Offramp's behaviour (refused otherwise, since ignoring them would change the result).
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64, description="vLLM extension: extra "
                                                   "token ids that end a choice (shown in the text, as in vLLM, "
                                                   "unless special).")
    min_tokens: StrictInt = Field(0, ge=0, le=INT32_MAX, description="vLLM extension: the end-of-sequence and "
                                  "stop_token_ids cannot end the output before this many tokens.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY, description="vLLM "
                                             "extension: > 1 discourages tokens of the prompt and output "
                                             "(positive logits divided, negative multiplied).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension: in [0, 1]; when sampling, drop "
                         "tokens whose probability is below min_p times the most likely token's.")
    skip_special_tokens: bool = Field(True, description="vLLM extension: only true (special tokens are never shown).")
    spaces_between_special_tokens: bool = Field(True, description="vLLM extension: accepted, no effect here.")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension: the matched stop string "
                                             "ends the text instead of being cut from it.")
    # OpenAI fields with no effect on the output: accepted and ignored.
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=16)
    store: bool | None = None
    service_tier: StrictStr | None = Field(None, max_length=32)

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, v: float) -> float:
        # Finite here (allow_inf_nan=False). -0.0 == 0: greedy.
        if v == 0.0:
            return 0.0
        if v < 0.0 or v > MAX_TEMPERATURE:
            raise BadRequestValue("temperature", f"temperature must be 0 (greedy) or within "
                                                 f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {v:g}")
        if v < MIN_TEMPERATURE:
            raise BadRequestValue("temperature", f"temperature {v:g} is below {MIN_TEMPERATURE}, too small to sample "
                                                 "with safely; use 0 for greedy decoding")
        return v

    @model_validator(mode="after")
    def _common_rules(self):
        if self.stream_options is not None and not self.stream:
            raise BadRequestValue("stream_options", "stream_options is only allowed when stream is true")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or len(key) > 10:
                raise BadRequestValue("logit_bias", f"logit_bias keys are token ids; got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise BadRequestValue("logit_bias", f"logit_bias values must be within [-100, 100]; got {bias:g} "
                                      f"for token {key}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise BadRequestValue("min_tokens", f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}")
        if not self.skip_special_tokens:
            raise BadRequestValue("skip_special_tokens", "skip_special_tokens=false is not supported; omit it")
        if self.stop_token_ids and any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise BadRequestValue("stop_token_ids", "stop_token_ids must be token ids (>= 0)")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    def sampling(self, max_tokens: int, vocab_size: int, eos_ids: tuple[int, ...]) -> SamplingParams:
        """The backend's sampling parameters (one builder for HTTP and gRPC): the
        request's stop token ids, plus the model's end-of-sequence ids unless ignore_eos."""
        user_stops = tuple(self.stop_token_ids or ())
        bad = [t for t in user_stops if t >= vocab_size]
        if bad:
            raise BadRequest(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                             param="stop_token_ids")
        bias = tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items() if v))
        bad = [t for t, _ in bias if t >= vocab_size]
        if bad:
            raise BadRequest(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                             param="logit_bias")
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(0, self.top_k), min_p=self.min_p, seed=self.seed,
                              stop_token_ids=user_stops + (() if self.ignore_eos else tuple(eos_ids)),
                              ignore_eos=self.ignore_eos, logprobs=self.logprob_count,
                              prompt_logprobs=self.prompt_logprob_count,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                              logit_bias=bias, min_tokens=min(self.min_tokens, max_tokens))

    # Log-probabilities asked for (None: not asked; k: the token's own plus k alternatives).
    @property
    def logprob_count(self) -> int | None:
        return None

    @property
    def prompt_logprob_count(self) -> int | None:
        return None

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def choices_generated(self) -> int:
        """Sequences the backend generates for this request (completions' ``best_of`` more)."""
        return self.n


class BadRequestValue(ValueError):
    """Raised inside validators: carries the parameter name to the OpenAI error's ``param``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        description="A string, a list holding one string, token ids, or a list holding one list of token ids."
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description=f"0..{MAX_TOP_LOGPROBS}: each token's log-probability plus "
        "this many most likely alternatives (from the head that chose the token: offramp.logprob_stages).")
    echo: bool = Field(False, description="Return the prompt in front of the completion; with logprobs, the "
                       "prompt's tokens get theirs too (a full-depth prefill; the first token has none).")
    best_of: StrictInt | None = Field(None, ge=1, le=INT32_MAX, description="Generate this many choices (>= n, "
                                      "counted against the server's n cap) and return the n with the highest mean "
                                      "log-probability per token; not with stream.")
    suffix: StrictStr | None = Field(None, description="Not supported: must be null.")

    @model_validator(mode="after")
    def _completion_rules(self):
        p = self.prompt
        if isinstance(p, list):
            if len(p) == 0:
                raise BadRequestValue("prompt", "prompt is empty")
            if isinstance(p[0], (str, list)) and len(p) != 1:
                raise BadRequestValue("prompt", f"batched prompts are not supported: got {len(p)} prompts, send one per request")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise BadRequestValue("best_of", f"best_of={self.best_of} is below n={self.n}; best_of must be >= n")
            if self.stream and self.best_of > 1:
                raise BadRequestValue("best_of", "best_of > 1 cannot be streamed (the best choices are known only at "
                                      "the end); set stream false or omit best_of")
        if self.suffix is not None:
            raise BadRequestValue("suffix", "suffix (insertion) is not supported by Offramp")
        return self

    @property
    def logprob_count(self) -> int | None:
        if self.logprobs is None and (self.best_of or 1) > self.n:
            return 0  # ranking the candidates needs each token's logprob
        return self.logprobs

    @property
    def choices_generated(self) -> int:
        return max(self.n, self.best_of or 1)  # best_of candidates, the best n returned

    @property
    def prompt_logprob_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompt_input(self) -> str | list[int]:
        """The single prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if isinstance(p[0], str):
            return p[0]
        if isinstance(p[0], list):
            return list(p[0])
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: StrictStr | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX, description="Newer name of max_tokens.")
    logprobs: bool = Field(False, description="Return each output token's log-probability (from the head that "
                           "chose it: offramp.logprob_stages).")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=f"0..{MAX_TOP_LOGPROBS} "
                                           "most likely alternatives per token; needs logprobs true.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    tools: list[Any] | None = None
    tool_choice: Any | None = None

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise BadRequestValue(
                    "max_completion_tokens",
                    f"max_tokens={self.max_tokens} and max_completion_tokens={self.max_completion_tokens} disagree; give one",
                )
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestValue("top_logprobs", "top_logprobs needs logprobs true; set logprobs or omit top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise BadRequestValue("response_format", "only response_format {'type': 'text'} is supported")
        if self.tools or self.tool_choice not in (None, "none"):
            raise BadRequestValue("tools", "tool calling is not supported by Offramp")
        return self

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_limits(req: SamplingFields, prompt_len: int, *, max_context: int, max_tokens_cap: int,
                 max_n: int, max_stop: int, max_stop_chars: int, default_max_tokens: int | None) -> int:
    """Check the settings-dependent limits; return the effective ``max_tokens``.

    ``default_max_tokens`` None means "as much as fits" (chat); completions pass 16 as OpenAI does.
    """
    if prompt_len == 0:
        raise BadRequest("prompt is empty after tokenization", param="prompt")
    if prompt_len >= max_context:
        raise BadRequest(
            f"prompt is {prompt_len} tokens but the model's context is {max_context}; shorten the prompt",
            param="prompt",
        )
    if req.n > max_n:
        raise BadRequest(f"n={req.n} is above this server's cap of {max_n}", param="n")
    best_of = getattr(req, "best_of", None) or 1
    if best_of > max_n:
        raise BadRequest(f"best_of={best_of} is above this server's cap of {max_n} choices", param="best_of")
    stops = req.stop_list
    if len(stops) > max_stop:
        raise BadRequest(f"stop has {len(stops)} strings; at most {max_stop} are allowed", param="stop")
    for s in stops:
        if not s or len(s) > max_stop_chars:
            raise BadRequest(f"each stop string must be 1..{max_stop_chars} characters, got {len(s)}", param="stop")
    room = max_context - prompt_len
    if req.max_tokens is None:
        want = default_max_tokens if default_max_tokens is not None else max_tokens_cap
        return max(1, min(want, max_tokens_cap, room))
    if req.max_tokens > max_tokens_cap:
        raise BadRequest(f"max_tokens={req.max_tokens} is above this server's cap of {max_tokens_cap}", param="max_tokens")
    if req.max_tokens > room:
        raise BadRequest(
            f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) = {prompt_len + req.max_tokens} "
            f"exceeds the model's context of {max_context} tokens; lower max_tokens or shorten the prompt",
            param="max_tokens",
        )
    return req.max_tokens

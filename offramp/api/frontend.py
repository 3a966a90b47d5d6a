"""What the HTTP and gRPC front ends need, bundled: the backend, the tokenizer and the
API settings, and the one place a validated request becomes a :class:`Generation`
(:meth:`Frontend.generation`), so both front ends check the same limits, sample the same
way and open the same request span."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from offramp.api.generation import Generation
from offramp.api.schemas import CompletionRequest, SamplingFields, check_limits
from offramp.observability import tracing
from offramp.protocol import Backend

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (and gRPC's Generate)


class ApiSettings(BaseModel):
    """Limits and identity of the OpenAI-compatible API (read once, at app creation)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("offramp-default", min_length=1, description="Name clients pass as `model`.")
    max_context: int = Field(ge=8, description="Cap on prompt + generated tokens.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    api_key: SecretStr | None = Field(None, description="Required on every route but /healthz; None = no auth.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body (400 request_too_large above).")
    max_n: int = Field(4, ge=1, le=64, description="Largest `n`; each choice is its own backend request.")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request (OpenAI allows 4).")
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string; bounds the text held back while streaming.")
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of one request end to end (504 after).")
    stop_token_ids: tuple[int, ...] | None = Field(
        None, description="Token ids that end generation (EOS, end-of-turn); None = the tokenizer's eos_token_id."
    )

    @model_validator(mode="after")
    def _cap_within_context(self) -> "ApiSettings":
        if self.max_tokens_cap >= self.max_context:
            # Not an error: a cap above the context simply never binds; clamp for clear messages.
            self.max_tokens_cap = self.max_context - 1
        return self


@dataclass
class Frontend:
    """Everything :func:`offramp.api.app.create_app` needs.

    ``backend`` implements :class:`offramp.protocol.Backend`; ``tokenizer`` is a Hugging
    Face fast tokenizer (see :func:`offramp.api.text.load_tokenizer`).
    """

    backend: Backend
    tokenizer: Any
    settings: ApiSettings

    @classmethod
    def from_app_args(cls, args: Any, backend: Backend, tokenizer: Any, *, model_context: int,
                      environ: Mapping[str, str] | None = None, **overrides: Any) -> "Frontend":
        """Build from :class:`offramp.deployments.config.AppArgs`.

        ``model_context`` is the model's own context length (config.json); ``AppArgs.max_context``
        may only lower it. The API key is read from ``environ[args.api_key_env]`` here, once.
        """
        env = os.environ if environ is None else environ
        key = env.get(args.api_key_env, "") if args.api_key_env else ""
        context = min(model_context, args.max_context) if args.max_context else model_context
        settings = ApiSettings(
            model_name=args.model_name,
            max_context=context,
            max_tokens_cap=args.max_tokens_cap,
            api_key=key or None,
            request_timeout_s=args.request_timeout_s,
            **overrides,
        )
        return cls(backend=backend, tokenizer=tokenizer, settings=settings)

    def generation(self, req: SamplingFields, prompt_ids: list[int], *, request_id: str, operation: str,
                   carrier: Mapping[str, str] | None, max_n: int, extra_stops: Sequence[str] = (),
                   timeout_s: float | None = None, attrs: Mapping[str, Any] | None = None) -> Generation:
        """An unstarted :class:`Generation` for a parsed request, built the same way for
        HTTP and gRPC: the limits checked (:func:`check_limits`; ``max_n`` is the front
        end's cap on choices), the sampling parameters made, and the request span opened as
        a child of the caller's ``carrier`` (``traceparent``) with the GenAI request
        attributes plus ``attrs``; the backend gets the span's carrier, so stage spans
        become its children. The span ends with :meth:`Generation.end_span`.
        ``timeout_s``: the deadline if shorter than the server's request timeout (gRPC's
        client deadline)."""
        s = self.settings
        max_tokens = check_limits(
            req, len(prompt_ids), max_context=s.max_context, max_tokens_cap=s.max_tokens_cap, max_n=max_n,
            max_stop=s.max_stop, max_stop_chars=s.max_stop_chars,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(req, CompletionRequest) else None)
        sampling = req.sampling(max_tokens, len(self.tokenizer), self.stop_token_ids())
        timeout = s.request_timeout_s if timeout_s is None else max(0.001, min(timeout_s, s.request_timeout_s))
        spans = contextlib.ExitStack()
        span = spans.enter_context(tracing.request_span(operation, carrier, {
            "gen_ai.request.model": s.model_name, "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": req.temperature, "gen_ai.request.top_p": req.top_p,
            "gen_ai.request.seed": req.seed, "offramp.exit_mode": str(req.offramp.exit),
            "offramp.max_draft": req.offramp.max_draft, "offramp.task": req.offramp.task, **(attrs or {})}))
        try:
            return Generation(
                self.backend, self.tokenizer, request_id=request_id, prompt_ids=prompt_ids,
                n=req.choices_generated, sampling=sampling, stops=[*req.stop_list, *extra_stops],
                kept_stops=req.stop_list if req.include_stop_str_in_output else (),
                exit_mode=req.offramp.exit, max_draft=req.offramp.max_draft, task=req.offramp.task,
                timeout_s=timeout, span=(span, spans),
                trace_context=tracing.inject(span, carrier) if span.is_recording() else carrier)
        except BaseException as e:
            spans.__exit__(type(e), e, e.__traceback__)
            raise

    def stop_token_ids(self) -> tuple[int, ...]:
        if self.settings.stop_token_ids is not None:
            return self.settings.stop_token_ids
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return (eos,) if isinstance(eos, int) else ()

"""Log-probabilities in the OpenAI response shapes.

The backend hands each token's :class:`~offramp.protocol.TokenLogprob` (token id, logprob,
top alternatives as ids); this module turns them into what clients parse:

* completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, where ``top_logprobs`` maps each alternative's text to its logprob and
  also holds the chosen token (vLLM's shape; lm-eval's greedy check relies on it). With
  ``echo`` the prompt's tokens come first; the first prompt token has ``None`` (nothing
  predicts it).
* chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [...]}], "refusal": None}``.

Token text is each id decoded alone (byte-level pieces of a multi-byte character decode
to U+FFFD, as in vLLM).
"""
from __future__ import annotations

from typing import Any, Iterable

from offramp.protocol import TokenLogprob

Items = Iterable[tuple[int, TokenLogprob | None]]


class LogprobFormatter:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        s = self._pieces.get(token_id)
        if s is None:
            s = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return s

    def completion(self, items: Items, offset: int = 0) -> tuple[dict[str, list], int]:
        """The completions ``logprobs`` object for ``items``, whose text starts at character
        ``offset`` of the choice's text; returns it and the offset after it (streaming
        continues from there)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in items:
            text = self.piece(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top:
                top.setdefault(self.piece(t), v)
            top.setdefault(text, lp.logprob)
            out["top_logprobs"].append(top)
        return out, offset

    def chat(self, items: Items) -> dict[str, Any]:
        """The chat ``logprobs`` object for ``items`` (output tokens only)."""
        content = []
        for token_id, lp in items:
            if lp is None:
                continue
            text = self.piece(token_id)
            content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": self.piece(t), "logprob": v,
                                              "bytes": list(self.piece(t).encode())} for t, v in lp.top]})
        return {"content": content, "refusal": None}

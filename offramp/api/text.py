"""Text side of the front end: prompt rendering, incremental detokenization, stop strings.

The backend only sees token ids; everything that turns text into ids and back lives here
so the HTTP and gRPC front ends share it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from offramp.errors import BadRequest

# Used when the tokenizer has no chat template. A base model continues after
# "assistant:"; FALLBACK_STOP ends the turn when it starts writing the next user line.
FALLBACK_STOP = "\nuser:"


def load_tokenizer(model_dir: str | Path) -> Any:
    """The Hugging Face tokenizer of a checkpoint directory (fast tokenizer required)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)


def render_fallback_chat(messages: Sequence[tuple[str, str]]) -> str:
    """``"{role}: {content}\\n"`` per message, then ``"assistant:"`` for the reply.

    A documented, template-free format for tokenizers without ``chat_template``.
    """
    lines = [f"{role}: {content}\n" for role, content in messages]
    return "".join(lines) + "assistant:"


def encode_chat(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[str]]:
    """Prompt ids for a chat, plus implicit stop strings (only for the fallback template)."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's raise_exception(), e.g. "roles must alternate"
            raise BadRequest(f"messages do not fit the model's chat template: {e}", param="messages") from e
        # The template writes BOS itself when the model wants one.
        return list(tokenizer.encode(text, add_special_tokens=False)), []
    text = render_fallback_chat(messages)
    return list(tokenizer.encode(text, add_special_tokens=True)), [FALLBACK_STOP]


def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Prompt ids for a completion; token-id prompts are range-checked against the vocabulary."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
    return list(prompt)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never change afterwards.

    Byte-level BPE can split one UTF-8 character over several tokens, and SentencePiece
    decodes a token differently depending on what precedes it. So each step decodes a
    short window (``prefix_offset`` .. end) and emits only the part beyond the already
    emitted window (``prefix_offset`` .. ``read_offset``), and only once the text no
    longer ends in an incomplete character (U+FFFD). The window starts inside the prompt
    so the first generated token gets its leading space right. Same scheme as TGI/vLLM.
    """

    CONTEXT = 5  # prompt tokens kept as left context for the first delta

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly stable text (often "", sometimes several chars)."""
        self.ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """At the end: return whatever is left, incomplete characters included."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopMatcher:
    """Finds stop strings in streamed text; holds back just enough text to never emit a
    partial stop string. Stop strings are cut from the output (OpenAI behaviour), except
    those in ``kept`` (vLLM's ``include_stop_str_in_output``), which end it. The earliest
    match wins; at one position, the first in ``stops``."""

    def __init__(self, stops: Sequence[str], kept: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.kept = set(kept)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped?)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [(i, k) for k, i in enumerate(buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            i, k = min(hits)
            stop = self.stops[k]
            self.pending = ""
            return buf[: i + len(stop) if stop in self.kept else i], True
        cut = max(0, len(buf) - self.hold)
        self.pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

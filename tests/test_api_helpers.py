"""Test helpers for the HTTP API: a tiny real tokenizer, a fake backend, a live server."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from offramp.protocol import GenerationRequest, TokenEvent

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, naive café and crème brûlée",
    "漢字 and emoji 🙂 are multi byte",
    "user: hi there\nassistant: hello again",
    "stop here STOP and go on",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(path: Path, chat_template: bool = True) -> Path:
    """Byte-level BPE trained on a few sentences, saved as a HF fast tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return path


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: splits multi-byte characters across tokens on purpose."""
    table = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in text.encode()]


@dataclass
class Outcome:
    emitted: int = 0
    finished: bool = False  # ran to its own last token (finish_reason sent)
    closed: bool = False  # the front end closed/cancelled it
    error: str | None = None


@dataclass
class FakeBackend:
    """Implements offramp.protocol.Backend: plays ``tokens`` in a loop (module state, reset per test)."""

    tokens: list[int]
    num_stages: int = 4
    exit_stages: list[int] = field(default_factory=lambda: [0, 3, 1, 2])
    delay_s: float = 0.0
    fail: Exception | None = None
    fail_at: int = 0
    eos_id: int | None = None
    eos_at: int | None = None
    requests: list[GenerationRequest] = field(default_factory=list)
    not_ready: str | None = None  # what readiness() reports (None: ready)
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def reset(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.exit_stages = [0, 3, 1, 2]
        self.delay_s, self.fail, self.fail_at, self.eos_at = 0.0, None, 0, None
        self.requests.clear()
        self.outcomes.clear()

    async def readiness(self) -> str | None:
        return self.not_ready

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        out = self.outcomes[request.request_id] = Outcome()
        try:
            limit = request.sampling.max_tokens
            for i in range(limit):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.fail is not None and i == self.fail_at:
                    out.error = type(self.fail).__name__
                    raise self.fail
                stage = self.exit_stages[i % len(self.exit_stages)]
                if self.eos_at is not None and i == self.eos_at:
                    out.emitted += 1
                    out.finished = True
                    yield TokenEvent(self.eos_id, stage, "stop")
                    return
                token = self.tokens[i % len(self.tokens)]
                stop = token in request.sampling.stop_token_ids and token != self.eos_id
                last = i == limit - 1 or stop
                out.emitted += 1
                out.finished = last
                yield TokenEvent(token, stage, "stop" if stop else "length" if last else None)
                if stop:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            out.closed = True
            raise
        finally:
            if not out.finished and out.error is None:
                out.closed = True


class LiveServer:
    """The real app under uvicorn on 127.0.0.1 and a random port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


def wait_for(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()

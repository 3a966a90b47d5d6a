"""Task accuracy: does the model do what its task types promise, in every exit mode.

``offramp eval --task-accuracy`` generates with the staged engine (the same
:class:`~offramp.ops.worker.StageWorker` code a served stage runs, split as the served
default config splits it) on the held-out *test* half:

* ``math``   - exact match of the answer on held-out problems, per difficulty level;
  ``two_digit`` is every held-out ``a+b`` / ``a-b`` with ``a, b < 100``. The prompt is
  ``a+b=``, the answer is what comes before the first newline or eos (its last ``=``
  part: multi-step answers write their intermediate results first).
* ``coding`` - held-out functions (whole held-out files, never trained on) cut after
  their signature: the share of greedy continuations that parse (``ast``) with a body,
  i.e. at least one statement besides a docstring or ``pass``.
* every task - speculative acceptance: drafts accepted per verify round, and tokens
  committed per deep-stage visit (accepted + the verifier's own).

Modes: ``off`` (full depth), ``calibrated`` (tokens leave at exits, agreement
guaranteed statistically) and ``speculative`` (exact); for the exact mode the share of
outputs identical to ``off`` is reported too.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from offramp.training.teacher import heldout_docs

_MATH_EXPR = re.compile(r"^[\d()+\-*]+$")


def math_level(expr: str) -> str:
    """The level of a held-out problem (data written before levels were stored too)."""
    if re.fullmatch(r"\d{1,2}[+-]\d{1,2}", expr):
        return "two_digit"
    if re.fullmatch(r"\d+[+-]\d+", expr):
        return "three_digit"
    if re.fullmatch(r"\d+\*\d+", expr):
        return "product"
    return "multi_step"


@dataclass
class Item:
    task: str
    prompt: str
    answer: str | None = None  # math: the expected answer
    level: str = ""


def math_items(docs: list[dict], limit: int) -> list[Item]:
    """Per level, up to ``limit`` held-out problems (``limit`` two-digit ones first)."""
    per: dict[str, list[Item]] = {}
    for d in docs:
        if d["task"] != "math":
            continue
        for line in d["text"].splitlines():
            expr, eq, rest = line.partition("=")
            if not eq or not _MATH_EXPR.match(expr):
                continue
            lv = d.get("level") or math_level(expr)
            per.setdefault(lv, []).append(Item("math", f"{expr}=", rest.split("=")[-1], lv))
    return [it for lv in sorted(per) for it in per[lv][:limit]]


def function_header(src: str) -> str | None:
    """The source of a function up to the end of its signature line(s), or None."""
    try:
        node = ast.parse(src).body[0]
    except (SyntaxError, IndexError, ValueError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
        return None
    import io
    import tokenize

    depth, end = 0, None
    try:
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.start[0] < node.lineno:  # decorators
                continue
            if t.type == tokenize.OP and t.string in "([{":
                depth += 1
            elif t.type == tokenize.OP and t.string in ")]}":
                depth -= 1
            elif t.type == tokenize.OP and t.string == ":" and depth == 0:
                end = t.start[0]  # 1-based line of the signature's colon
                break
    except (tokenize.TokenError, SyntaxError):
        return None
    if end is None or node.body[0].lineno <= end:  # body on the def line
        return None
    return "".join(src.splitlines(keepends=True)[:end])


def code_items(docs: list[dict], limit: int) -> list[Item]:
    out = []
    for d in docs:
        if d["task"] != "coding" or d.get("unit") != "function":
            continue
        head = function_header(d["text"])
        if head is not None and not head.lstrip().startswith("@"):
            out.append(Item("coding", head))
        if len(out) >= limit:
            break
    return out


def prose_items(docs: list[dict], tok, limit: int, prompt_tokens: int = 32) -> list[Item]:
    out = []
    for d in docs:
        if d["task"] != "qa":
            continue
        ids = tok(d["text"], add_special_tokens=False)["input_ids"][:prompt_tokens]
        if len(ids) == prompt_tokens:
            out.append(Item("qa", tok.decode(ids)))
        if len(out) >= limit:
            break
    return out


def function_body(header: str, continuation: str, finished: bool) -> str:
    """The generated body: the continuation up to the first line back at the header's
    indentation (the function ended) or eos; if generation stopped mid-body, its last,
    possibly cut line is dropped."""
    indent = len(header) - len(header.lstrip())
    lines = continuation.splitlines(keepends=True)
    body, ended = [], finished
    for ln in lines:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            ended = True
            break
        body.append(ln)
    if not ended and body and not body[-1].endswith("\n"):
        body.pop()
    return "".join(body)


def parses_with_body(header: str, continuation: str, finished: bool) -> bool:
    src = textwrap.dedent(header + function_body(header, continuation, finished))
    try:
        node = ast.parse(src).body[0]
    except (SyntaxError, IndexError, ValueError):
        return False
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    real = [s for s in node.body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            and not isinstance(s, ast.Pass)]
    return bool(real)


def math_answer(text: str) -> str:
    """The final result the model wrote: its first line's last ``=`` part (a multi-step
    answer ``64+7=71`` shows its intermediate results first)."""
    return text.split("\n")[0].split("=")[-1].strip()


class InProcess:
    """Task generations by the staged engine in this process, split as served."""

    def __init__(self, model_dir: Path, num_stages: int, batch: int, tok):
        from offramp.ops.engine import StagedModel

        self.eng = StagedModel(model_dir, num_stages=num_stages)
        self.batch, self.tok = batch, tok  # prompts generated together
        self.stages = [list(r) for r in self.eng.ranges]
        self.where = f"in process, {num_stages} stages"

    def run(self, prompts: list[list[int]], max_tokens: int, mode: str, task: str) -> list[tuple]:
        from offramp.ops.sampling import SamplingParams
        from offramp.ops.worker import ExitPolicy

        policy = ExitPolicy.from_request(mode, task)  # calibrated: the task's thresholds
        out = []
        for s in self.eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), policy):
            out.append((self.tok.decode(s.generated, skip_special_tokens=True), s.finish_reason == "stop",
                        list(s.generated), s.draft_counts))
        return out


class Served:
    """Task generations from a running Offramp server (``POST /v1/completions``, greedy,
    token-id prompts, the exit mode and task hint in the ``offramp`` block), ``concurrency``
    requests at a time: what the served config does with the embedded model, e.g. its
    speculative acceptance (a default server drafts only while one request is active)."""

    def __init__(self, url: str, api_key: str | None, concurrency: int = 1):
        import httpx

        self.url, self.batch = url.rstrip("/"), concurrency  # requests in flight together
        # one connection pool for every request (httpx.Client is thread-safe)
        self.http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=300)
        card = self.http.get(f"{self.url}/v1/models", timeout=30).raise_for_status().json()["data"][0]
        self.model = card["id"]
        self.stages = card.get("offramp", {}).get("num_stages")
        self.where = f"served at {self.url} ({self.stages} stages)"

    def _one(self, prompt: list[int], max_tokens: int, mode: str, task: str) -> tuple:
        from offramp.protocol import DraftCounts

        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "offramp": {"exit": mode, "task": task}}
        r = self.http.post(f"{self.url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.text[:300]}")
        c = r.json()["choices"][0]
        spec = c["offramp"].get("speculative") or {}
        return (c["text"], c["finish_reason"] == "stop", list(c["offramp"]["token_ids"]),
                DraftCounts(spec.get("drafted", 0), spec.get("accepted", 0), spec.get("verify_rounds", 0)))

    def run(self, prompts: list[list[int]], max_tokens: int, mode: str, task: str) -> list[tuple]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, len(prompts))) as pool:
            return list(pool.map(lambda p: self._one(p, max_tokens, mode, task), prompts))


def task_accuracy(model_dir: Path, data_dir: Path, modes: list[str] | None = None,
                  num_stages: int = 2, math_per_level: int = 200, code_items_n: int = 100,
                  prose_n: int = 40, code_tokens: int = 128, prose_tokens: int = 64,
                  batch: int = 32, threads: int = 1, progress: bool = True, server: Served | None = None) -> dict:
    """Task metrics per exit mode (see the module docstring); generated in this process,
    or by ``server`` (its tokenizer must be ``model_dir``'s)."""
    import torch
    from tqdm import tqdm

    from offramp.protocol import DraftCounts

    torch.set_num_threads(threads)
    modes = modes or ["off", "calibrated", "speculative"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.model_max_length = 10**9  # whole chapters are tokenized, then cut
    gen = server or InProcess(model_dir, num_stages, batch, tok)
    docs = heldout_docs(data_dir, "test")
    items = {"math": math_items(docs, math_per_level), "coding": code_items(docs, code_items_n),
             "qa": prose_items(docs, tok, prose_n)}
    max_new = {"math": 24, "coding": code_tokens, "qa": prose_tokens}
    outputs: dict[str, dict[str, list]] = {m: {} for m in modes}
    counts: dict[str, dict[str, DraftCounts]] = {m: {} for m in modes}
    total = sum(len(v) for v in items.values()) * len(modes)
    bar = tqdm(total=total, disable=not progress, desc="task accuracy", dynamic_ncols=True)
    for mode in modes:
        for task, its in items.items():
            res, dc = [], DraftCounts()
            prompts = [tok(it.prompt)["input_ids"] for it in its]
            for chunk in (prompts[i:i + gen.batch] for i in range(0, len(prompts), gen.batch)):
                for text, finished, ids, drafts in gen.run(chunk, max_new[task], mode, task):
                    res.append((text, finished, ids))
                    dc += drafts
                bar.update(len(chunk))
            outputs[mode][task] = res
            counts[mode][task] = dc
    bar.close()
    report: dict = {"model": str(model_dir), "split": "heldout/test", "generated": gen.where,
                    "stages": gen.stages, "modes": {}}
    for mode in modes:
        r: dict = {}
        m_out = outputs[mode]["math"]
        by_level: dict[str, list[bool]] = {}
        for it, (text, _, _) in zip(items["math"], m_out):
            by_level.setdefault(it.level, []).append(math_answer(text) == it.answer)
        r["math_exact"] = {lv: round(sum(v) / len(v), 4) for lv, v in sorted(by_level.items())}
        r["math_n"] = {lv: len(v) for lv, v in sorted(by_level.items())}
        c_out = outputs[mode]["coding"]
        ok = [parses_with_body(it.prompt, text, fin) for it, (text, fin, _) in zip(items["coding"], c_out)]
        r["code_parses_with_body"] = round(sum(ok) / len(ok), 4) if ok else None
        r["code_n"] = len(ok)
        if mode != "off" and "off" in outputs:
            same = {t: sum(a[2] == b[2] for a, b in zip(outputs[mode][t], outputs["off"][t])) / max(len(items[t]), 1)
                    for t in items}
            r["identical_to_off"] = {t: round(v, 4) for t, v in same.items()}
        if mode == "speculative":
            r["accepted_per_round"] = {t: dc.report()["mean_accepted"] for t, dc in counts[mode].items()}
            r["tokens_per_deep_visit"] = {
                t: round((dc.accepted + dc.rounds) / dc.rounds, 3) if dc.rounds else None
                for t, dc in counts[mode].items()}
        report["modes"][mode] = r
    report["examples"] = {
        "math": [(it.prompt, outputs[modes[0]]["math"][i][0]) for i, it in enumerate(items["math"][:3])],
        "coding": [(it.prompt, outputs[modes[0]]["coding"][i][0]) for i, it in enumerate(items["coding"][:2])],
    }
    return report


def format_report(rep: dict) -> str:
    lines = [f"task accuracy on {rep['split']}, {rep.get('generated', '')}, stages {rep['stages']}"]
    for mode, r in rep["modes"].items():
        ms = ", ".join(f"{lv} {v:.3f} (n={r['math_n'][lv]})" for lv, v in r["math_exact"].items())
        lines.append(f"[{mode}] math exact: {ms}")
        lines.append(f"[{mode}] code parses with a body: {r['code_parses_with_body']} (n={r['code_n']})")
        if "identical_to_off" in r:
            lines.append(f"[{mode}] outputs identical to off: {r['identical_to_off']}")
        if "accepted_per_round" in r:
            lines.append(f"[{mode}] drafts accepted per round: {r['accepted_per_round']}; "
                         f"tokens per deep visit: {r['tokens_per_deep_visit']}")
    return "\n".join(lines)

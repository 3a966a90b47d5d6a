"""``offramp prepare-data``: an offline, reproducible corpus and tokenizer.

Three task types, from material any machine of the project has or can get from a
package registry (no model hub):

* ``math``   - synthetic arithmetic of graded difficulty, from ``17+25=42`` to
  multi-step expressions with their intermediate results;
* ``coding`` - Python source: the standard library shipped with the interpreter;
* ``qa``     - English prose: the King James Bible (public domain, Debian package
  ``bible-kjv-text``, decoded with its ``bible`` tool) plus Python's own
  ``pydoc_data/topics.py`` (always present, the fallback when the Bible is absent).

Held-out split: every *unit* (one arithmetic problem, one source file, one Bible
chapter, one pydoc topic) goes to ``heldout`` iff a hash of its key falls in the
held-out bucket - a pure function of the key and the seed, so the split is stable and
training never sees a held-out unit. Output directory::

    manifest.json           seed, sources, counts, sha256 of each file
    train.jsonl heldout.jsonl   {"task": ..., "key": ..., "text": ...} per line
    tokenizer/              byte-level BPE, Hugging Face format (AutoTokenizer)
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

TASKS = ("qa", "math", "coding")
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BIBLE_DEBS = ("bible-kjv", "bible-kjv-text")


@dataclass
class DataSpec:
    seed: int = 0
    heldout_frac: float = 0.05  # share of units (problems, files, chapters) held out
    math_problems: int = 30_000  # sampled 3-digit and multi-step problems (before the split)
    math_docs: int = 400_000  # training documents drawn (one problem each), levels weighted
    coding_max_bytes: int = 4_000_000  # cap on stdlib source read
    qa_max_bytes: int = 4_500_000  # cap on prose read
    vocab_size: int = 4096
    tokenizer_sample_bytes: int = 3_000_000  # per-task text the BPE trainer sees


def is_heldout(key: str, seed: int, frac: float) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < frac


# ---------------------------------------------------------------- math
# Graded difficulty: every one- and two-digit sum and difference (all carries and
# borrows, negative results included), then three-digit ones, products with one
# digit, and multi-step expressions written out with their intermediate results.
# A document is one problem, ``12+30=42``, closed by the stream's eos: the answer
# terminates, which is what a prompt ``12+30=`` must learn.
MATH_LEVELS = ("two_digit", "three_digit", "product", "multi_step")
MATH_WEIGHTS = {"two_digit": 0.5, "three_digit": 0.2, "product": 0.15, "multi_step": 0.15}


def _line(expr: str) -> str:
    return f"{expr}={eval(expr)}"  # noqa: S307 - generated digits and operators only


def _math_level(level: str, rng: random.Random) -> tuple[str, str]:
    if level == "three_digit":
        a, b = rng.randint(100, 999), rng.randint(0, 999)
        if rng.random() < 0.5:
            a, b = b, a
        expr = f"{a}{rng.choice('+-')}{b}"
        return expr, _line(expr)
    if level == "multi_step":
        if rng.random() < 0.5:  # (a op b) op c, with the inner result shown
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 9)
            op1, op2 = rng.choice("+-"), rng.choice("*+-")
            inner = eval(f"{a}{op1}{b}")  # noqa: S307
            expr = f"({a}{op1}{b}){op2}{c}"
            return expr, f"{expr}={inner}{op2}{c}={eval(expr)}"  # noqa: S307
        a, b, c, d, e = (rng.randint(2, 20) for _ in range(5))
        p, q = a * b, c * d
        expr = f"{a}*{b}+{c}*{d}-{e}"
        return expr, f"{expr}={p}+{q}-{e}={p + q}-{e}={p + q - e}"
    raise ValueError(level)


def math_units(spec: DataSpec) -> list[tuple[str, str, str]]:
    """(key, line, level) per distinct problem; the key is the expression.

    Enumerated where the space is small (every ``a±b`` with ``a, b < 100``, every
    ``a*b`` with ``a < 100, b < 10``), sampled where it is not."""
    units = [(f"{a}{op}{b}", _line(f"{a}{op}{b}"), "two_digit")
             for a in range(100) for b in range(100) for op in "+-"]
    units += [(f"{a}*{b}", _line(f"{a}*{b}"), "product")
              for a in range(100) for b in range(10)]
    rng = random.Random(spec.seed * 1_000_003 + 7)
    seen = {k for k, _, _ in units}
    for level in ("three_digit", "multi_step"):
        n = 0
        while n < spec.math_problems // 2:
            expr, line = _math_level(level, rng)
            if expr not in seen:
                seen.add(expr)
                units.append((expr, line, level))
                n += 1
    return units


def _math_docs(units: list[tuple[str, str, str]], n_docs: int | None, seed: int) -> list[dict]:
    """One problem per document. ``n_docs``: draw that many, levels weighted by
    ``MATH_WEIGHTS`` (training); ``None``: every unit once (held out)."""
    rng = random.Random(seed)
    if n_docs is None:
        picked = list(units)
        rng.shuffle(picked)
    else:
        by_level: dict[str, list] = {}
        for u in units:
            by_level.setdefault(u[2], []).append(u)
        levels = [lv for lv in MATH_LEVELS if lv in by_level]
        weights = [MATH_WEIGHTS[lv] for lv in levels]
        picked = [rng.choice(by_level[lv]) for lv in rng.choices(levels, weights, k=n_docs)]
    return [{"task": "math", "key": k, "level": lv, "text": line} for k, line, lv in picked]


# ---------------------------------------------------------------- coding
def stdlib_files(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, source) of the interpreter's stdlib, tests and vendored trees out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
            "ensurepip", "__pycache__", "turtledemo", "tkinter", "idlelib", "pydoc_data")
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > 200_000:
            continue
        out.append((rel.as_posix(), text))
        total += len(text)
        if total >= max_bytes:
            break
    return out


def function_units(rel: str, text: str, max_chars: int = 2_000) -> list[tuple[str, str]]:
    """(key, source) of every function and method in a file, dedented to column 0 with
    its decorators: a definition followed by its body, the shape a prompt
    ``def area(width, height):`` asks to continue (a random window of a file rarely
    starts at a ``def``)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        src = textwrap.dedent("".join(lines[first:node.end_lineno]))
        if len(src) > max_chars or src.count("\n") < 2:
            continue
        out.append((f"stdlib:{rel}::{node.name}@{node.lineno}", src))
    return out


# ---------------------------------------------------------------- qa / prose
def _bible_tool(cache: Path | None) -> tuple[list[str], str] | None:
    """Command prefix that prints the KJV, from an installed package or one unpacked
    from the Debian archive into ``cache`` (``apt-get download``; no install)."""
    if Path("/usr/bin/bible").exists() and Path("/usr/lib/bible.data").exists():
        return ["/usr/bin/bible"], "/usr/lib/bible.data"
    if cache is None:
        return None
    root = cache / "bible-kjv"
    binary, datafile = root / "usr/bin/bible", root / "usr/lib/bible.data"
    if not (binary.exists() and datafile.exists()):
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["apt-get", "download", *BIBLE_DEBS], cwd=tmp,
                               capture_output=True, text=True)
            if r.returncode != 0:
                return None
            root.mkdir(parents=True, exist_ok=True)
            for deb in sorted(Path(tmp).glob("*.deb")):
                subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    if not (binary.exists() and datafile.exists()):
        return None
    return [str(binary)], str(datafile)


def bible_chapters(cache: Path | None, max_bytes: int) -> list[tuple[str, str]]:
    tool = _bible_tool(cache)
    if tool is None:
        return []
    cmd, datafile = tool
    # the tool joins its search path and the file name, so pass them apart
    r = subprocess.run([*cmd, "-f", "-l0", "-p", str(Path(datafile).parent), "-d",
                        Path(datafile).name, "Gen1:1-Rev22:21"],
                       capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        return []
    chapters: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        ref, _, verse = line.partition(" ")
        if ":" not in ref or not verse.strip():
            continue
        chapter = ref.split(":")[0]  # e.g. 'Ge1'
        chapters.setdefault(chapter, []).append(verse.strip())
    out, total = [], 0
    for chapter, verses in chapters.items():
        text = " ".join(verses) + "\n"
        out.append((f"kjv:{chapter}", text))
        total += len(text)
        if total >= max_bytes:
            break
    return out


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{k}", v.strip() + "\n") for k, v in sorted(topics.items()) if v.strip()]


# ---------------------------------------------------------------- corpus
def build_corpus(spec: DataSpec, cache: Path | None) -> tuple[list[dict], list[dict], dict]:
    """(train docs, held-out docs, source summary)."""
    train, held = [], []
    mu = math_units(spec)
    mtrain = [u for u in mu if not is_heldout("math:" + u[0], spec.seed, spec.heldout_frac)]
    mheld = [u for u in mu if is_heldout("math:" + u[0], spec.seed, spec.heldout_frac)]
    train += _math_docs(mtrain, spec.math_docs, spec.seed)
    held += _math_docs(mheld, None, spec.seed + 1)

    code = stdlib_files(spec.coding_max_bytes)
    n_fn = 0
    for rel, text in code:
        key = f"stdlib:{rel}"
        docs = [{"task": "coding", "key": key, "text": text}]
        docs += [{"task": "coding", "key": k, "unit": "function", "text": src}
                 for k, src in function_units(rel, text)]
        n_fn += len(docs) - 1
        # a file's functions follow the file: never one in training, one held out
        (held if is_heldout(key, spec.seed, spec.heldout_frac) else train).extend(docs)

    bible = bible_chapters(cache, spec.qa_max_bytes)
    prose = bible + pydoc_topics()
    for key, text in prose:
        doc = {"task": "qa", "key": key, "text": text}
        (held if is_heldout(key, spec.seed, spec.heldout_frac) else train).append(doc)
    sources = {
        "math": (f"synthetic arithmetic, {len(mu)} distinct problems "
                 f"({', '.join(MATH_LEVELS)}), {spec.math_docs} training draws"),
        "coding": (f"Python {sys.version.split()[0]} standard library, {len(code)} files "
                   f"and their {n_fn} functions"),
        "qa": (f"King James Bible (Debian bible-kjv-text), {len(bible)} chapters; " if bible
               else "King James Bible unavailable; ") + "pydoc_data.topics",
    }
    return train, held, sources


def train_tokenizer(texts_by_task: dict[str, list[str]], spec: DataSpec, out: Path) -> None:
    """Byte-level BPE with single-digit pre-splitting (arithmetic stays learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def sample():
        for task in TASKS:
            n = 0
            for text in texts_by_task.get(task, []):
                yield text
                n += len(text)
                if n >= spec.tokenizer_sample_bytes:
                    break

    tok.train_from_iterator(sample(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=512)
    fast.save_pretrained(str(out))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_tokenizer(src: Path, out: Path) -> None:
    """Reuse a checkpoint's tokenizer (continued training keeps its vocabulary)."""
    from transformers import AutoTokenizer

    if not (Path(src) / "tokenizer.json").is_file() and not (Path(src) / "tokenizer" / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} holds no tokenizer.json; pass a checkpoint or "
                                "prepare-data directory, or drop --tokenizer to train one")
    src = Path(src) / "tokenizer" if (Path(src) / "tokenizer" / "tokenizer.json").is_file() else Path(src)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))


def prepare(out_dir: str | Path, spec: DataSpec, cache: Path | None = None,
            tokenizer: str | Path | None = None) -> dict:
    """Write the corpus; train a tokenizer on it, or copy ``tokenizer`` (a checkpoint
    or prepare-data directory) so a model trained on the old data can continue."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held, sources = build_corpus(spec, cache)
    for name, docs in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / name, "w") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    by_task: dict[str, list[str]] = {}
    for d in train:
        by_task.setdefault(d["task"], []).append(d["text"])
    if tokenizer is None:
        train_tokenizer(by_task, spec, out / "tokenizer")
    else:
        copy_tokenizer(Path(tokenizer), out / "tokenizer")
    counts = {split: {t: sum(1 for d in docs if d["task"] == t) for t in TASKS}
              for split, docs in (("train", train), ("heldout", held))}
    chars = {t: sum(len(d["text"]) for d in train if d["task"] == t) for t in TASKS}
    manifest = {
        "spec": spec.__dict__, "tokenizer": str(tokenizer) if tokenizer else "trained",
        "sources": sources, "docs": counts, "train_chars": chars,
        "sha256": {n: _sha(out / n) for n in ("train.jsonl", "heldout.jsonl",
                                              "tokenizer/tokenizer.json")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_docs(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; run `offramp prepare-data --out {data_dir}` first")
    with open(path) as f:
        return [json.loads(line) for line in f]

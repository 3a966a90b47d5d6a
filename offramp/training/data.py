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
    math_problems: int = 60_000  # arithmetic problems generated before the split
    coding_max_bytes: int = 4_000_000  # cap on stdlib source read
    qa_max_bytes: int = 4_500_000  # cap on prose read
    vocab_size: int = 4096
    tokenizer_sample_bytes: int = 3_000_000  # per-task text the BPE trainer sees


def is_heldout(key: str, seed: int, frac: float) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < frac


# ---------------------------------------------------------------- math
def _math_problem(rng: random.Random) -> tuple[str, str]:
    """(expression, full line). Difficulty levels 1..4 with rising share of steps."""
    level = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
    if level == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        expr = f"{a}{op}{b}"
        return expr, f"{expr}={eval(expr)}"
    if level == 2:
        if rng.random() < 0.5:
            a, b = rng.randint(2, 99), rng.randint(2, 9)
            expr = f"{a}*{b}"
        else:
            a, b = rng.randint(100, 999), rng.randint(10, 999)
            expr = f"{a}{rng.choice('+-')}{b}"
        return expr, f"{expr}={eval(expr)}"
    if level == 3:  # (a op b) op c, shown with the intermediate result
        a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 9)
        op1, op2 = rng.choice("+-"), rng.choice("*+-")
        inner = eval(f"{a}{op1}{b}")
        expr = f"({a}{op1}{b}){op2}{c}"
        return expr, f"{expr}={inner}{op2}{c}={eval(expr)}"
    # level 4: a*b+c*d-e, step by step left to right after the products
    a, b, c, d, e = (rng.randint(2, 20) for _ in range(5))
    p, q = a * b, c * d
    expr = f"{a}*{b}+{c}*{d}-{e}"
    return expr, f"{expr}={p}+{q}-{e}={p + q}-{e}={p + q - e}"


def math_units(spec: DataSpec) -> list[tuple[str, str]]:
    """(key, line) per distinct problem; the key is the expression (dedup by it)."""
    rng = random.Random(spec.seed * 1_000_003 + 7)
    seen: dict[str, str] = {}
    while len(seen) < spec.math_problems:
        expr, line = _math_problem(rng)
        seen.setdefault(expr, line)
    return list(seen.items())


def _math_docs(units: list[tuple[str, str]], seed: int, per_doc: int = 16) -> list[dict]:
    rng = random.Random(seed)
    units = list(units)
    rng.shuffle(units)
    docs = []
    for i in range(0, len(units), per_doc):
        chunk = units[i:i + per_doc]
        docs.append({"task": "math", "key": "|".join(k for k, _ in chunk),
                     "text": "\n".join(line for _, line in chunk) + "\n"})
    return docs


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
    train += _math_docs(mtrain, spec.seed)
    held += _math_docs(mheld, spec.seed + 1)

    code = stdlib_files(spec.coding_max_bytes)
    for rel, text in code:
        doc = {"task": "coding", "key": f"stdlib:{rel}", "text": text}
        (held if is_heldout(doc["key"], spec.seed, spec.heldout_frac) else train).append(doc)

    bible = bible_chapters(cache, spec.qa_max_bytes)
    prose = bible + pydoc_topics()
    for key, text in prose:
        doc = {"task": "qa", "key": key, "text": text}
        (held if is_heldout(key, spec.seed, spec.heldout_frac) else train).append(doc)
    sources = {
        "math": f"synthetic arithmetic, {len(mu)} distinct problems, levels 1-4",
        "coding": f"Python {sys.version.split()[0]} standard library, {len(code)} files",
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


def prepare(out_dir: str | Path, spec: DataSpec, cache: Path | None = None) -> dict:
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
    train_tokenizer(by_task, spec, out / "tokenizer")
    counts = {split: {t: sum(1 for d in docs if d["task"] == t) for t in TASKS}
              for split, docs in (("train", train), ("heldout", held))}
    chars = {t: sum(len(d["text"]) for d in train if d["task"] == t) for t in TASKS}
    manifest = {
        "spec": spec.__dict__, "sources": sources, "docs": counts, "train_chars": chars,
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

"""prepare-data, the tokenizer, pretraining, train-gates: small and fast (tiny data/models)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from offramp.training.data import DataSpec, TASKS, prepare, read_docs

TINY = DataSpec(seed=3, heldout_frac=0.3, math_problems=400, math_docs=2_000, coding_max_bytes=60_000,
                qa_max_bytes=60_000, vocab_size=400, tokenizer_sample_bytes=40_000)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("data")
    prepare(out, TINY, cache=None)
    return out


def test_prepare_data_is_deterministic(data_dir, tmp_path):
    prepare(tmp_path, TINY, cache=None)
    for name in ("train.jsonl", "heldout.jsonl", "tokenizer/tokenizer.json", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes(), name


def test_heldout_is_disjoint_and_covers_every_task(data_dir):
    train, held = read_docs(data_dir, "train"), read_docs(data_dir, "heldout")
    for task in TASKS:
        assert any(d["task"] == task for d in held), task
        assert any(d["task"] == task for d in train), task
    # units: one problem (math), one file / chapter / topic (others)
    def units(docs):
        return {(d["task"], u) for d in docs
                for u in (d["key"].split("|") if d["task"] == "math" else [d["key"]])}
    assert not units(train) & units(held)
    train_lines = {ln for d in train if d["task"] == "math" for ln in d["text"].splitlines()}
    held_lines = {ln for d in held if d["task"] == "math" for ln in d["text"].splitlines()}
    assert held_lines and not train_lines & held_lines
    assert any("=" in ln and "*" in ln and ln.count("=") >= 2 for ln in train_lines)  # multi-step


def test_tokenizer_round_trip(data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>" and tok.pad_token_id is not None
    for s in ["17+25=42", "(12+7)*3=19*3=57", "def f(x):\n    return {'a': x}  # é ✓\n",
              "In the beginning was the Word.", "  trailing  spaces \n\n"]:
        ids = tok(s).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == s
    digits = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False).input_ids)
    assert digits == list("12345")  # single-digit pre-split


def test_layer_states_match_hf_hidden_states():
    from offramp.training.pretrain import TrainSpec, build_model, layer_states

    spec = TrainSpec(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=4)
    model = build_model(spec, 300, 0, 1, 2).eval()
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        ours = layer_states(model, ids)
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    for L in range(3):
        torch.testing.assert_close(ours[L], ref[L])
    torch.testing.assert_close(model.model.norm(ours[3]), ref[3])  # HF's last one is normed


def test_exit_loss_terms_mix_ce_and_distillation_on_a_position_subset():
    import torch.nn.functional as F

    from offramp.training.heads import ExitHeads, backbone
    from offramp.training.pretrain import TrainSpec, build_model, exit_loss_terms, layer_states

    spec = TrainSpec(hidden=32, intermediate=64, layers=4, heads=4, kv_heads=4,
                     exit_kd=0.0, exit_token_frac=1.0)
    model = build_model(spec, 300, 0, 1, 2).eval()
    bb = backbone(model)
    heads = ExitHeads(bb, [1, 2, 3])
    ids = torch.randint(3, 300, (2, 9))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        hs = layer_states(model, x)
        final = bb.lm_head(bb.final_norm(hs[-1]))
        # kd 0, every position: plain CE of each exit head, all exits in one step
        ce = exit_loss_terms(spec, bb, heads, hs, final, y, step=0, bf16=False)
        assert sorted(ce) == [1, 2, 3]
        for L, v in ce.items():
            ref = F.cross_entropy(bb.lm_head(heads.norms[str(L)](hs[L])).flatten(0, 1), y.flatten())
            torch.testing.assert_close(v, ref)
        # kd 1 is pure KL toward the final layer: zero where the exit head sees the final
        # hidden state through the final norm (exit norms start as its copies), positive
        # where its norm differs
        spec_kd = TrainSpec(**{**spec.__dict__, "exit_kd": 1.0, "exit_token_frac": 0.5})
        hs_same = [hs[-1]] * len(hs)
        heads.norms["1"].weight.mul_(3.0)
        kd = exit_loss_terms(spec_kd, bb, heads, hs_same, final, y, step=3, bf16=False)
        assert kd[2].abs().item() < 1e-5 and kd[1].item() > 1e-3
        # the subset is a pure function of (seed, step): same step, same loss
        again = exit_loss_terms(spec_kd, bb, heads, hs, final, y, step=3, bf16=False)
        other = exit_loss_terms(spec_kd, bb, heads, hs, final, y, step=4, bf16=False)
        repeat = exit_loss_terms(spec_kd, bb, heads, hs, final, y, step=3, bf16=False)
        torch.testing.assert_close(again[1], repeat[1])
        assert not torch.allclose(again[1], other[1])
    # rotating subset when fewer exits per step than exit layers
    spec_rot = TrainSpec(**{**spec.__dict__, "exits_per_step": 1})
    with torch.no_grad():
        picked = [list(exit_loss_terms(spec_rot, bb, heads, hs, final, y, step=s, bf16=False))
                  for s in range(3)]
    assert picked == [[1], [2], [3]]


def test_train_tiny_resumes_and_exports(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offramp.ops.exits import load_exits_config
    from offramp.training.pretrain import TrainSpec, train

    spec = TrainSpec(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=4, batch=2,
                     seq_len=16, steps=4, warmup=1, ckpt_every=2)
    out = tmp_path / "m"
    train(data_dir, out, spec, progress=False)
    log1 = json.loads((out / "train_log.json").read_text())
    threads = torch.get_num_threads()
    try:  # resumes at the end: nothing more to do (another thread count or budget is the same run)
        train(data_dir, out, TrainSpec(**{**spec.__dict__, "threads": 2, "time_budget_min": 60.0}),
              progress=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "train_log.json").read_text()) == log1 and len(log1) == 4
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 3
    gen = model.generate(**tok("1+1=", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > 1
    cfg = load_exits_config(out)
    assert cfg.exit_layers == [1, 2] and not cfg.gate_enabled


def _sha(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if not p.name.startswith("offramp_exits")}


def test_train_gates_writes_valid_exits_and_leaves_backbone(data_dir, tmp_path):
    from safetensors.torch import load_file

    from offramp.ops.exits import EXITS_TENSORS, exit_tensor_names, load_exits_config
    from offramp.ops.presets import make_checkpoint
    from offramp.training.gates import GateSpec, train_gates

    model_dir = make_checkpoint(tmp_path / "tiny", "tiny", seed=5)
    before = _sha(model_dir)
    res = train_gates(model_dir, data_dir, GateSpec(steps=3, batch=3, seq_len=32))
    assert _sha(model_dir) == before
    cfg = load_exits_config(model_dir)
    assert cfg.exit_layers == [1, 2, 3] and cfg.gate_enabled and cfg.thresholds == {}
    assert 0 < cfg.gate_threshold <= 0.5 and res["stage1"]["steps"] == 3
    t = load_file(str(model_dir / EXITS_TENSORS))
    hidden = 64
    for L in cfg.exit_layers:
        names = [n for n in exit_tensor_names(L) if n in t]
        assert f"exits.{L}.norm.weight" in names and t[f"exits.{L}.norm.weight"].shape == (hidden,)
        assert t[f"exits.{L}.gate.fc.weight"].shape == (1, hidden + cfg.task_dim)
        assert t[f"exits.{L}.gate.fc.bias"].shape == (1,)
        assert t[f"exits.{L}.gate.task_embedding.weight"].shape == (len(cfg.task_types), cfg.task_dim)
    assert set(t) <= {n for L in cfg.exit_layers for n in exit_tensor_names(L)}


def test_cli_missing_model_dir_is_one_line(capsys, tmp_path):
    from offramp.cli import main

    for cmd in ("train-gates", "calibrate", "eval"):
        rc = main([cmd, "--model", str(tmp_path / "nope"), "--data", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and "config.json" in err, err


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_train_gates_other_families_and_joint_stage(data_dir, tmp_path, family):
    from safetensors.torch import load_file

    from offramp.ops.exits import EXITS_TENSORS, load_exits_config
    from offramp.ops.presets import make_checkpoint
    from offramp.training.gates import GateSpec, train_gates

    model_dir = make_checkpoint(tmp_path / family, "tiny", seed=2, family=family)
    before = _sha(model_dir)
    joint = tmp_path / "joint"
    train_gates(model_dir, data_dir, GateSpec(steps=1, joint_steps=1, batch=2, seq_len=16),
                exit_layers=[2], joint_out=joint)
    assert _sha(model_dir) == before and not (model_dir / EXITS_TENSORS).exists()
    cfg = load_exits_config(joint)
    assert cfg.exit_layers == [2] and "stage2" in cfg.training["gates"]
    t = load_file(str(joint / EXITS_TENSORS))
    assert ("exits.2.norm.bias" in t) == (family == "gpt2")


def test_math_is_graded_one_problem_per_document_and_terminates(data_dir):
    train, held = read_docs(data_dir, "train"), read_docs(data_dir, "heldout")
    two = {f"{a}{op}{b}" for a in range(100) for b in range(100) for op in "+-"}
    seen_train = {d["key"] for d in train if d["task"] == "math" and d["level"] == "two_digit"}
    seen_held = {d["key"] for d in held if d["task"] == "math" and d["level"] == "two_digit"}
    # every one- and two-digit sum and difference is in exactly one split (training draws
    # repeat problems, so a small draw covers only part of its side)
    assert seen_held and not seen_train & seen_held and (seen_train | seen_held) <= two
    assert len(seen_held) == sum(1 for k in two if k not in seen_train and k in seen_held)
    levels = {d["level"] for d in train if d["task"] == "math"}
    assert levels == {"two_digit", "three_digit", "product", "multi_step"}
    for d in train + held:
        if d["task"] == "math":
            expr, _, rest = d["text"].partition("=")
            assert "\n" not in d["text"] and d["key"] == expr  # one problem, no trailing text
            assert int(rest.split("=")[-1]) == eval(expr)  # noqa: S307


def test_code_has_functions_with_their_bodies(data_dir):
    import ast

    fns = [d for d in read_docs(data_dir, "train") if d.get("unit") == "function"]
    assert len(fns) > 5
    for d in fns:
        node = ast.parse(d["text"]).body[0]
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
        assert d["key"].split("::")[0] in {x["key"] for x in read_docs(data_dir, "train")}


def test_continued_training_shares_the_tokenizer_and_the_weights(data_dir, tmp_path):
    from transformers import AutoTokenizer

    from offramp.ops.presets import make_checkpoint
    from offramp.training.heads import ExitHeads, backbone
    from offramp.training.pretrain import TrainSpec, build_model, export, load_init

    spec = TrainSpec(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=4)
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    src = build_model(spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    heads = ExitHeads(backbone(src), [1, 2])
    with torch.no_grad():
        heads.norms["1"].weight.mul_(2.0)
    export(src, heads, tok, tmp_path / "src", spec, [])
    # prepare-data --tokenizer copies the checkpoint's vocabulary instead of training one
    again = tmp_path / "data2"
    prepare(again, TINY, cache=None, tokenizer=tmp_path / "src")
    assert AutoTokenizer.from_pretrained(str(again / "tokenizer")).get_vocab() == tok.get_vocab()
    spec2 = TrainSpec(**{**spec.__dict__, "seed": 9})
    model = build_model(spec2, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    heads2 = ExitHeads(backbone(model), [1, 2])
    load_init(model, heads2, str(tmp_path / "src"), tok)
    ref = src.to(torch.bfloat16).float().state_dict()  # exported as bf16
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    torch.testing.assert_close(heads2.norms["1"].weight, heads.norms["1"].weight)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)  # another vocabulary
    with pytest.raises(ValueError, match="vocabulary"):
        load_init(model, heads2, str(other), tok)
    big = build_model(TrainSpec(**{**spec.__dict__, "hidden": 64}), len(tok), 0, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        load_init(big, ExitHeads(backbone(big), [1]), str(tmp_path / "src"), tok)


def test_functions_and_problems_are_tokenized_as_prompt_and_continuation(data_dir):
    """A prompt ``def f(x):\\n`` ends in a bare newline token; in running text BPE merges
    the newline with the next line's indentation (and ``=`` with a negative answer's
    minus). Training shows functions and problems cut where a prompt would end, so the
    model has seen what follows the prompt's last token."""
    from transformers import AutoTokenizer

    from offramp.training.pretrain import docs_ids, token_streams

    def doc_ids(tok, doc):
        return docs_ids(tok, [doc])[0]

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    doc = {"task": "coding", "unit": "function", "text": "def area(width, height):\n    return width * height\n"}
    ids = doc_ids(tok, doc)
    prompt = tok("def area(width, height):\n")["input_ids"]
    assert ids[:len(prompt)] == prompt  # the prompt's own tokens, bare newline included
    assert tok.decode(ids, skip_special_tokens=True) == doc["text"]
    plain = {"task": "coding", "text": doc["text"]}  # a whole file: tokenized as it comes
    assert doc_ids(tok, plain) == tok(doc["text"])["input_ids"]
    neg = {"task": "math", "text": "6-13=-7"}  # BPE merges "=-" in running text
    assert tok("6-13=-7")["input_ids"][:len(tok("6-13=")["input_ids"])] != tok("6-13=")["input_ids"]
    assert doc_ids(tok, neg)[:len(tok("6-13=")["input_ids"])] == tok("6-13=")["input_ids"]
    assert tok.decode(doc_ids(tok, neg), skip_special_tokens=True) == neg["text"]
    streams = token_streams(data_dir, tok, data_dir / "streams_test.pt")
    fn = next(d for d in read_docs(data_dir, "train") if d.get("unit") == "function")
    needle = doc_ids(tok, fn)
    hay = streams["coding"].tolist()
    assert any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))

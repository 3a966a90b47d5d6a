"""offramp eval's task accuracy: the scorers (math answer, code that parses with a body),
the held-out items, and a generation run on a tiny checkpoint in every exit mode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offramp.training.tasks import (code_items, function_body, function_header, math_answer, math_items,
                                    math_level, parses_with_body)


def test_function_header_ends_at_the_signature():
    src = ('@dec(1)\ndef f(a,\n      b: int = (1, 2)) -> dict[str, int]:\n'
           '    # a comment\n    """doc"""\n    return a\n')
    assert function_header(src) == '@dec(1)\ndef f(a,\n      b: int = (1, 2)) -> dict[str, int]:\n'
    assert function_header("def f(): return 1\n") is None  # nothing to continue
    assert function_header("x = 1\n") is None
    assert function_header("def f(:\n") is None


@pytest.mark.parametrize("cont,finished,ok", [
    ("    return width * height\n\ndef other():\n", False, True),  # ends at the dedent
    ("    area = width * height\n    return area", True, True),  # eos ends it
    ("    x = 1\n    y = (", False, True),  # cut mid-line: the cut line is dropped
    ('    """Only a docstring."""\n', True, False),  # no statement
    ("    pass\n", True, False),
    ("\nclass A:\n    pass\n", False, False),  # blank line, then something else
    ("    return (width *\n", True, False),  # does not parse
    ("", True, False),
])
def test_parses_with_body(cont, finished, ok):
    assert parses_with_body("def area(width, height):\n", cont, finished) is ok


def test_function_body_keeps_nested_blocks_and_methods_indentation():
    head = "    def m(self, x):\n"
    cont = "        if x:\n            return 1\n\n        return 2\n    def n(self):\n"
    assert function_body(head, cont, False) == "        if x:\n            return 1\n\n        return 2\n"
    assert parses_with_body(head, cont, False)


def test_math_items_levels_and_answers():
    docs = [{"task": "math", "key": "12+30", "text": "12+30=42"},
            {"task": "math", "key": "5-17", "text": "5-17=-12"},
            {"task": "math", "key": "(3+4)*2", "text": "(3+4)*2=7*2=14"},
            {"task": "math", "key": "123-4", "level": "three_digit", "text": "123-4=119"},
            {"task": "coding", "key": "x", "text": "1+1=2"}]
    items = {it.prompt: it for it in math_items(docs, 10)}
    assert set(items) == {"12+30=", "5-17=", "(3+4)*2=", "123-4="}
    assert items["12+30="].answer == "42" and items["12+30="].level == "two_digit"
    assert items["5-17="].answer == "-12"
    assert items["(3+4)*2="].answer == "14" and items["(3+4)*2="].level == "multi_step"
    assert math_level("7*8") == "product" and math_level("100+2") == "three_digit"
    assert math_answer("42") == "42" and math_answer("-12\n3+4=7") == "-12"
    assert math_answer("7*2=14") == "14"  # intermediate results first, the final one counts


def test_code_items_are_held_out_functions_cut_after_the_signature():
    docs = [{"task": "coding", "key": "f", "unit": "function",
             "text": "def f(a):\n    return a\n"},
            {"task": "coding", "key": "file", "text": "def g(a):\n    return a\n"},  # whole file
            {"task": "coding", "key": "h", "unit": "function",
             "text": "@cache\ndef h():\n    return 1\n"}]  # decorated: skipped
    assert [it.prompt for it in code_items(docs, 10)] == ["def f(a):\n"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from offramp.ops.presets import make_checkpoint
    from offramp.training.data import DataSpec, prepare
    from offramp.training.gates import GateSpec, train_gates

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tasks")
    data = root / "data"
    prepare(data, DataSpec(seed=2, heldout_frac=0.4, math_problems=300, math_docs=1_000,
                           coding_max_bytes=40_000, qa_max_bytes=40_000, vocab_size=300,
                           tokenizer_sample_bytes=20_000))
    model_dir = make_checkpoint(root / "tiny", "tiny", seed=4)
    train_gates(model_dir, data, GateSpec(steps=1, batch=2, seq_len=16))
    return model_dir, data


def test_task_accuracy_runs_every_mode_and_speculative_is_exact(tiny, capsys):
    from offramp.cli import main
    import json

    model_dir, data = tiny
    rc = main(["eval", "--model", str(model_dir), "--data", str(data), "--max-tokens", "300",
               "--samples", "10", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)["task_accuracy"]
    assert set(rep["modes"]) == {"off", "calibrated", "speculative"}
    off, spec = rep["modes"]["off"], rep["modes"]["speculative"]
    assert off["math_n"]["two_digit"] == 10 and off["code_n"] > 0
    # a random tiny model gets no sum right, and no function body either
    assert off["math_exact"]["two_digit"] == 0.0
    # speculative output is the full model's, token for token, on every task
    assert spec["identical_to_off"] == {"math": 1.0, "coding": 1.0, "qa": 1.0}
    assert spec["math_exact"] == off["math_exact"]
    assert set(spec["accepted_per_round"]) == {"math", "coding", "qa"}
    assert all(v is None or v >= 1.0 for v in spec["tokens_per_deep_visit"].values())


def test_task_accuracy_through_a_running_server_equals_in_process(tiny, capsys):
    """``offramp eval --url``: the same items generated by a server over HTTP (the real API
    over the in-process backend, split as --stages) score as they do in this process, and
    the server's speculative rounds are counted."""
    import json

    from offramp.api.app import create_app
    from offramp.api.frontend import ApiSettings, Frontend
    from offramp.api.text import load_tokenizer
    from offramp.cli import main
    from offramp.ops.engine import InProcessBackend, StagedModel
    from test_api_helpers import LiveServer

    model_dir, data = tiny
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--samples", "5", "--json",
              "--modes", "off,speculative"]
    assert main(common + ["--max-tokens", "100"]) == 0
    local = json.loads(capsys.readouterr().out)["task_accuracy"]
    staged = StagedModel(model_dir, num_stages=2)
    fe = Frontend(backend=InProcessBackend(staged), tokenizer=load_tokenizer(model_dir),
                  settings=ApiSettings(model_name="tiny", max_context=staged.max_seq, max_tokens_cap=256))
    with LiveServer(create_app(fe)) as web:
        assert main(common + ["--url", web.url, "--api-key-env", "", "--concurrency", "2"]) == 0
    served = json.loads(capsys.readouterr().out)["task_accuracy"]
    assert served["generated"].startswith(f"served at {web.url}") and served["stages"] == 2
    for mode in ("off", "speculative"):
        for key in ("math_exact", "math_n", "code_parses_with_body", "code_n"):
            assert served["modes"][mode][key] == local["modes"][mode][key], (mode, key)
    assert served["modes"]["speculative"]["identical_to_off"] == {"math": 1.0, "coding": 1.0, "qa": 1.0}
    assert served["modes"]["speculative"]["tokens_per_deep_visit"] == local["modes"]["speculative"]["tokens_per_deep_visit"]

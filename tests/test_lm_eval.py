"""lm-eval (EleutherAI's harness, a client Offramp did not write) against the served
pipeline: model type ``local-completions`` over the real HTTP path (HAProxy, ingress,
stage replicas), the shipped task files (``offramp/evals/lm_eval_tasks``: a loglikelihood
task and a generate-until task, data made from the held-out arithmetic), scored equal to
lm-eval's own transformers backend (``hf``) on the same checkpoint.

The session app has no exit heads, so its default policy runs full depth (= exits off),
and the harness's prompt logprobs are a full-depth prefill whatever the policy.
"""
from __future__ import annotations

import pytest

from serve_fixtures import MODEL_NAME

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TASKS = ["offramp_arith_mc", "offramp_arith_gen"]
LIMIT = 24


def _evaluate(model: str, model_args: str, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from offramp.evals import LM_EVAL_TASKS

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, limit=LIMIT, log_samples=True,
                                   task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)), **kw)


def test_lm_eval_scores_served_equal_transformers(serve_cluster):
    from offramp.api.text import load_tokenizer

    model_dir = serve_cluster.model_dir
    tok = load_tokenizer(model_dir)
    bos = tok("a").input_ids[0] == tok.bos_token_id  # the client adds BOS iff the model's tokenizer does
    served = _evaluate("local-completions",
                       f"model={MODEL_NAME},base_url={serve_cluster.base_url}/completions,"
                       f"tokenizer={model_dir},tokenized_requests=True,add_bos_token={bos},num_concurrent=2,"
                       "max_retries=1")
    ref = _evaluate("hf", f"pretrained={model_dir},dtype=float32", device="cpu", batch_size=1)

    assert served["results"]["offramp_arith_mc"]["acc,none"] == ref["results"]["offramp_arith_mc"]["acc,none"]
    assert served["results"]["offramp_arith_gen"]["exact_match,none"] == \
        ref["results"]["offramp_arith_gen"]["exact_match,none"]
    # Per document, not just the mean: every choice's loglikelihood, every generation.
    mc = zip(served["samples"]["offramp_arith_mc"], ref["samples"]["offramp_arith_mc"])
    for a, b in mc:
        assert a["doc"] == b["doc"]
        got, want = [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]]
        assert got == pytest.approx(want, abs=1e-3), a["doc"]
    gen = zip(served["samples"]["offramp_arith_gen"], ref["samples"]["offramp_arith_gen"])
    for a, b in gen:
        assert a["filtered_resps"] == b["filtered_resps"], a["doc"]

"""Evaluation assets that ship with Offramp (no hub needed): lm-eval task files for the
embedded model's arithmetic, run against a served Offramp or any other backend."""
from __future__ import annotations

from pathlib import Path

LM_EVAL_TASKS = Path(__file__).parent / "lm_eval_tasks"  # pass to lm_eval --include_path

"""Exit heads, gates and thresholds: the Offramp exits file that sits beside a checkpoint.

A checkpoint directory stays a plain Hugging Face directory; Offramp's additions live
in two files beside it and never touch the backbone's files:

* ``offramp_exits.json``  - metadata (this module's :class:`ExitsConfig`)
* ``offramp_exits.safetensors`` - per exit layer ``L`` (an exit after the first ``L``
  decoder layers, 1 <= L < num_layers):

  - ``exits.{L}.norm.weight`` (and ``exits.{L}.norm.bias`` for LayerNorm models, GPT-2):
    the exit head's copy of the final norm. The LM head itself is shared (the model's
    own ``lm_head`` / tied embedding), so an exit head costs one norm vector.
  - ``exits.{L}.gate.fc.weight`` ``(1, hidden + task_dim)``, ``exits.{L}.gate.fc.bias``
    ``(1,)`` and ``exits.{L}.gate.task_embedding.weight`` ``(num_tasks, task_dim)``: the
    cheap tier-1 gate ``sigmoid(fc([norm(h_t), task_embedding[task]]))`` over the normed
    boundary hidden state of the current token. Optional: a gate without these tensors
    runs on confidence alone.

Exit taps are data: a stage boundary after layer ``L`` can exit iff ``L`` is listed in
``exit_layers``. Split points may move (placement) without retraining anything.

Decision at a boundary (two tiers, so the LM head is not run blindly):

1. gate tier: ``p_gate >= gate_threshold`` (skipped when the gate is disabled/absent);
2. confidence tier: LM head on ``norm_L(h_t)``; ``confidence(logits) >= threshold[L][task]``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

EXITS_JSON = "offramp_exits.json"
EXITS_TENSORS = "offramp_exits.safetensors"
FORMAT = "offramp-exits/1"
DEFAULT_TASKS = ("qa", "math", "coding")
# Speculative drafting goes on while the exit head's confidence is at least this; without
# calibrated draft thresholds every draft runs to max_draft (forced drafts).
DEFAULT_DRAFT_THRESHOLD = float("-inf")

ConfidenceMetric = Literal["max_prob", "margin", "entropy"]


class Calibration(BaseModel):
    """Provenance of calibrated thresholds (written by ``offramp calibrate``)."""

    method: str = Field("learn-then-test", description="How thresholds were chosen.")
    target: float = Field(description="Target agreement of exited tokens with full depth.")
    delta: float = Field(description="Allowed probability that the guarantee fails.")
    n: int = Field(description="Held-out tokens used per gate/task.")
    date: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    notes: str = Field("", description="Free text: data, command line.")


class ExitsConfig(BaseModel):
    """Metadata of the exits file. Thresholds are keyed by exit layer then task type."""

    format: str = Field(FORMAT, description="File format tag; bump on breaking change.")
    exit_layers: list[int] = Field(description="Layer counts after which an exit head exists.")
    task_types: list[str] = Field(default=list(DEFAULT_TASKS), description="Gate task vocabulary.")
    task_dim: int = Field(16, description="Width of the gate's task embedding.")
    metric: ConfidenceMetric = Field("max_prob", description="Confidence measure of the exit head.")
    gate_enabled: bool = Field(True, description="Use the learned tier-1 gate when its tensors exist.")
    gate_threshold: float = Field(0.5, description="Tier-1 gate probability needed to run the exit head.")
    thresholds: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="threshold[str(L)][task]; key 'default' is used for unknown tasks. "
        "A missing layer means that exit never fires.",
    )
    min_layers: int = Field(1, description="No exit before this many layers have run.")
    draft_thresholds: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Speculative mode: draft_thresholds[str(L)][task], the exit confidence a drafted token "
        "needs for drafting to go on, chosen for expected speed (`offramp calibrate-draft`). Missing: "
        "DEFAULT_DRAFT_THRESHOLD.",
    )
    draft_calibration: dict = Field(default_factory=dict, description="Provenance of the draft thresholds: "
                                    "cost model and the expected speedup per layer and task.")
    calibration: Calibration | None = Field(None, description="Provenance of the thresholds.")
    training: dict = Field(default_factory=dict, description="Provenance of the exit heads.")

    @field_validator("exit_layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError(f"exit_layers must be >= 1, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _thresholds_match_layers(self) -> "ExitsConfig":
        for key in [*self.thresholds, *self.draft_thresholds]:
            if int(key) not in self.exit_layers:
                raise ValueError(
                    f"thresholds has layer {key} but exit_layers is {self.exit_layers}; "
                    "add the layer to exit_layers or drop its thresholds"
                )
        return self

    def threshold(self, layer: int, task: str | None) -> float:
        """Threshold for an exit after ``layer`` layers; +inf means 'never exit here'."""
        per_task = self.thresholds.get(str(layer))
        if not per_task:
            return math.inf
        if task is not None and task in per_task:
            return per_task[task]
        return per_task.get("default", max(per_task.values()))

    def draft_threshold(self, layer: int, task: str | None) -> float:
        per_task = self.draft_thresholds.get(str(layer))
        if not per_task:
            return DEFAULT_DRAFT_THRESHOLD
        if task is not None and task in per_task:
            return per_task[task]
        return per_task.get("default", DEFAULT_DRAFT_THRESHOLD)

    def task_index(self, task: str | None) -> int:
        if task is None or task not in self.task_types:
            return 0
        return self.task_types.index(task)


def exits_present(model_dir: str | Path) -> bool:
    return (Path(model_dir) / EXITS_JSON).is_file()


def load_exits_config(model_dir: str | Path) -> ExitsConfig:
    path = Path(model_dir) / EXITS_JSON
    return ExitsConfig.model_validate_json(path.read_text())


def exit_tensor_names(layer: int) -> list[str]:
    p = f"exits.{layer}."
    return [p + s for s in ("norm.weight", "norm.bias", "gate.fc.weight", "gate.fc.bias",
                            "gate.task_embedding.weight")]


def save_exits(model_dir: str | Path, config: ExitsConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write both files atomically enough for a CLI (tmp file + rename)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    tmp = model_dir / (EXITS_TENSORS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(model_dir / EXITS_TENSORS)
    tmpj = model_dir / (EXITS_JSON + ".tmp")
    tmpj.write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    tmpj.replace(model_dir / EXITS_JSON)


class Gate(nn.Module):
    """The tier-1 gate of one exit layer, the one definition training (``train-gates``,
    ``offramp train``) and serving (the stage's gate) share: ``fc([normed, task_emb[task]])``
    over the exit head's normed hidden state; its parameters are the exits file's
    ``exits.{L}.gate.*`` tensors."""

    def __init__(self, hidden: int, num_tasks: int, task_dim: int):
        super().__init__()
        self.fc = nn.Linear(hidden + task_dim, 1)
        self.task_embedding = nn.Embedding(num_tasks, task_dim)
        nn.init.normal_(self.task_embedding.weight, std=0.02)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, normed: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """normed (N, H), task (N,) -> gate logit (N,)."""
        x = torch.cat([normed, self.task_embedding(task).to(normed.dtype)], dim=-1)  # (N, H+D)
        return self.fc(x).squeeze(-1)

    def prob(self, normed: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The gate's probability that the token may exit (N,), in float32."""
        return torch.sigmoid(self(normed, task).float())


def confidence(logits: torch.Tensor, metric: ConfidenceMetric) -> torch.Tensor:
    """Confidence per row of ``logits`` (B, V) -> (B,); larger means surer.

    ``entropy`` is returned negated (so a threshold is still 'confidence >= t').
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    if metric == "max_prob":
        return probs.max(dim=-1).values
    if metric == "margin":
        top2 = probs.topk(2, dim=-1).values  # (B, 2)
        return top2[:, 0] - top2[:, 1]
    if metric == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    raise ValueError(f"unknown confidence metric {metric!r}; use max_prob, margin or entropy")

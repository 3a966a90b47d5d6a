"""``offramp train-gates``: exit heads and gates for any supported checkpoint.

Stage 1 (always): the backbone is frozen. Each exit head (a copy of the final norm in
front of the shared LM head) learns from the full model - KL toward the final layer's
distribution plus cross-entropy on the data. Each gate learns the binary target
"this exit head's argmax equals the final argmax" from the (detached) normed boundary
state and the task embedding.

Stage 2 (``--joint``): the backbone is unfrozen and trained with the early-exit loss;
the result is written to a *new* directory. The input directory's backbone files are
never written; only the exits file beside them is (stage 1).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.errors import ConfigError
from offramp.ops.exits import ExitsConfig, exits_present, load_exits_config, save_exits
from offramp.training.data import TASKS, read_docs
from offramp.training.heads import ExitHeads, backbone, load_exit_tensors, use_bf16
from offramp.training.teacher import load_model, token_windows


@dataclass
class GateSpec:
    steps: int = 300
    batch: int = 8
    seq_len: int = 256
    head_lr: float = 1e-3
    gate_lr: float = 1e-3  # seed recipe 3e-5 leaves a zero-init gate near p=0.5 here
    kl_weight: float = 0.5  # head loss = kl_weight * KL(final || exit) + (1 - kl_weight) * CE
    gate_recall: float = 0.95  # gate threshold keeps this share of agreeing tokens
    joint_steps: int = 0
    joint_lr: float = 3e-4
    bf16: bool | None = None  # CPU bf16 autocast; None: only where the CPU has native bf16
    seed: int = 0
    threads: int = 1


def _train_windows(data_dir: Path, tok, spec: GateSpec, tasks: list[str]) -> dict[str, torch.Tensor]:
    docs = read_docs(data_dir, "train")
    need = spec.steps * spec.batch * spec.seq_len // max(len(tasks), 1) + spec.seq_len
    need = min(need, 400_000)
    wins = {t: token_windows(docs, tok, t, spec.seq_len, need) for t in tasks}
    wins = {t: w for t, w in wins.items() if len(w)}
    if not wins:
        raise ConfigError(f"no training text in {data_dir}/train.jsonl; run "
                          "`offramp prepare-data` first")
    return wins


def _batch(wins: dict[str, torch.Tensor], task_types: list[str], spec: GateSpec,
           g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    names = sorted(wins)
    rows, tasks = [], []
    for i in range(spec.batch):
        t = names[i % len(names)]
        w = wins[t]
        rows.append(w[int(torch.randint(0, len(w), (1,), generator=g))])
        tasks.append(task_types.index(t))
    return torch.stack(rows), torch.tensor(tasks)  # (B, T+1), (B,)


def _step_losses(model, heads: ExitHeads, x, y, tasks, spec: GateSpec, frozen: bool):
    """Sum of head and gate losses over every exit; also the gate (prob, target) pairs."""
    bb = backbone(model)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(spec.bf16))
    with torch.set_grad_enabled(not frozen), amp:
        out = model(input_ids=x, output_hidden_states=True)
    final = out.logits.float().flatten(0, 1)  # (B*T, V)
    teacher = F.log_softmax(final.detach(), -1)
    fpred = final.argmax(-1)
    yflat = y.flatten()
    T = x.shape[1]
    task = tasks.repeat_interleave(T)  # (B*T,)
    loss_head = loss_gate = torch.zeros(())
    pairs = []
    for L in heads.exit_layers:
        normed = heads.norms[str(L)](out.hidden_states[L].float().flatten(0, 1))  # (B*T, H)
        with amp:
            logits = bb.lm_head(normed).float()  # (B*T, V)
        logp = F.log_softmax(logits, -1)
        kl = F.kl_div(logp, teacher, log_target=True, reduction="batchmean")
        ce = F.nll_loss(logp, yflat)
        loss_head = loss_head + spec.kl_weight * kl + (1 - spec.kl_weight) * ce
        target = (logits.argmax(-1) == fpred).float()
        glogit = heads.gates[str(L)](normed.detach(), task)
        loss_gate = loss_gate + F.binary_cross_entropy_with_logits(glogit, target)
        pairs.append((torch.sigmoid(glogit).detach(), target))
    loss = loss_head + loss_gate
    if not frozen:
        loss = loss + F.cross_entropy(final, yflat)
    return loss, loss_head.item(), loss_gate.item(), pairs


def _gate_threshold(pairs: list[tuple[torch.Tensor, torch.Tensor]], recall: float) -> float:
    """Largest threshold that keeps ``recall`` of agreeing tokens (training data only)."""
    probs = torch.cat([p for p, _ in pairs])
    pos = probs[torch.cat([t for _, t in pairs]) > 0.5]
    if pos.numel() == 0:
        return 0.5
    q = torch.quantile(pos, 1 - recall).item()
    return float(min(max(q, 0.01), 0.5))


def _run(model, heads: ExitHeads, wins, task_types, spec: GateSpec, steps: int,
         frozen: bool, desc: str) -> dict:
    from tqdm import tqdm

    if frozen:
        model.requires_grad_(False)
        groups = [{"params": list(heads.norms.parameters()), "lr": spec.head_lr},
                  {"params": list(heads.gates.parameters()), "lr": spec.gate_lr}]
    else:
        model.requires_grad_(True)
        groups = [{"params": list(model.parameters()), "lr": spec.joint_lr},
                  {"params": list(heads.parameters()), "lr": spec.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    hist, tail = [], []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=2)
    for step in bar:
        w, tasks = _batch(wins, task_types, spec, g)
        loss, lh, lg, pairs = _step_losses(model, heads, w[:, :-1], w[:, 1:], tasks, spec, frozen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append((lh, lg))
        tail = (tail + pairs)[-len(heads.exit_layers) * 20:]  # last ~20 steps
        bar.set_postfix(head=f"{lh:.3f}", gate=f"{lg:.3f}", refresh=False)
    n = max(min(20, len(hist)), 1)
    acc = torch.cat([((p >= 0.5).float() == t).float() for p, t in tail]).mean().item() if tail else None
    return {"steps": steps, "head_loss_last": sum(h for h, _ in hist[-n:]) / n,
            "gate_loss_last": sum(x for _, x in hist[-n:]) / n, "gate_acc_last": acc,
            "gate_threshold": _gate_threshold(tail, spec.gate_recall) if tail else 0.5}


def train_gates(model_dir: Path, data_dir: Path, spec: GateSpec,
                exit_layers: list[int] | None = None, joint_out: Path | None = None) -> dict:
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    if spec.joint_steps and joint_out is None:
        raise ConfigError("--joint needs --joint-out DIR: stage 2 changes the backbone and "
                          "never overwrites the input checkpoint")
    model, tok = load_model(model_dir)
    bb = backbone(model)
    old = load_exits_config(model_dir) if exits_present(model_dir) else None
    if exit_layers is None:
        exit_layers = old.exit_layers if old else list(range(1, bb.num_layers))
    task_types = old.task_types if old else list(TASKS)
    task_dim = old.task_dim if old else 16
    heads = ExitHeads(bb, exit_layers, len(task_types), task_dim)
    heads.load_tensors({k: v for k, v in load_exit_tensors(model_dir).items() if ".norm." in k})
    wins = _train_windows(data_dir, tok, spec, [t for t in task_types if t in TASKS])
    stage1 = _run(model, heads, wins, task_types, spec, spec.steps, True, "train-gates")
    training = dict(old.training) if old else {}
    training["gates"] = {"spec": asdict(spec), "stage1": stage1, "data": str(data_dir)}
    out_dir = model_dir
    if spec.joint_steps:
        out_dir = Path(joint_out)
        if out_dir.resolve() == Path(model_dir).resolve():
            raise ConfigError("--joint-out must differ from --model")
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        stage2 = _run(model, heads, wins, task_types, spec, spec.joint_steps, False, "joint")
        training["gates"]["stage2"] = stage2
        dtype = getattr(model.config, "dtype", None) or torch.float32
        model.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    cfg = ExitsConfig(
        exit_layers=exit_layers, task_types=task_types, task_dim=task_dim,
        metric=old.metric if old else "max_prob", gate_enabled=True,
        gate_threshold=training["gates"].get("stage2", stage1)["gate_threshold"],
        thresholds={}, min_layers=old.min_layers if old else 1, calibration=None,
        training=training)
    save_exits(out_dir, cfg, heads.to_tensors(with_gates=True))
    return {"out": str(out_dir), "exit_layers": exit_layers, **training["gates"]}

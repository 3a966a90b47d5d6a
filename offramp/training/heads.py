"""Exit heads and gates as trainable modules, and the backbone access they need.

Exit head at layer ``L``: a copy of the model's final norm; logits are the shared LM
head applied to ``norm_L(h_L)``. Gate: ``sigmoid(fc([norm_L(h_L), task_emb[task]]))``.
Tensor names and the file format are those of :mod:`offramp.ops.exits`.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from offramp.errors import ConfigError
from offramp.ops.exits import Gate


@functools.lru_cache(maxsize=1)
def bf16_autocast_pays() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX).

    Measured: with them, CPU autocast to bf16 makes a training step ~1.5x faster; without
    them (AVX2-only cores, e.g. the AMD EPYC CI machines) bf16 is emulated and the same
    step is ~6x *slower* (train-gates step, batch 8x256: 23 s vs 3.6 s in fp32).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(flag: bool | None) -> bool:
    """Resolve a spec's ``bf16`` field: ``None`` means decide from the CPU."""
    return bf16_autocast_pays() if flag is None else bool(flag)


@dataclass
class Backbone:
    """The pieces of a Hugging Face causal LM that exits touch (Llama/Qwen2/GPT-2)."""

    model: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    hidden: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def backbone(model: nn.Module) -> Backbone:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "norm"):
        layers, norm = inner.layers, inner.norm  # Llama, Qwen2, Mistral...
    elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        layers, norm = model.transformer.h, model.transformer.ln_f  # GPT-2
    else:
        raise ConfigError(
            f"{type(model).__name__} is not a supported decoder (Llama, Qwen2 or GPT-2 "
            "layout); use one of those checkpoints")
    head = model.get_output_embeddings()
    return Backbone(model, layers, norm, head, head.weight.shape[1])


class ExitHeads(nn.Module):
    """Per exit layer: a norm copy (``norms[str(L)]``) and a gate (``gates[str(L)]``)."""

    def __init__(self, bb: Backbone, exit_layers: list[int], num_tasks: int = 3,
                 task_dim: int = 16):
        super().__init__()
        bad = [L for L in exit_layers if not 1 <= L < bb.num_layers]
        if bad:
            raise ConfigError(f"exit layers {bad} out of range 1..{bb.num_layers - 1}; "
                              "an exit must leave at least one layer to skip")
        self.exit_layers = sorted(exit_layers)
        self.norms = nn.ModuleDict({str(L): copy.deepcopy(bb.final_norm).float()
                                    for L in self.exit_layers})
        for p in self.norms.parameters():
            p.requires_grad_(True)
        self.gates = nn.ModuleDict({str(L): Gate(bb.hidden, num_tasks, task_dim)
                                    for L in self.exit_layers})

    def to_tensors(self, with_gates: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        for L in self.exit_layers:
            for name, t in self.norms[str(L)].state_dict().items():
                out[f"exits.{L}.norm.{name}"] = t.float()
            if with_gates:
                for name, t in self.gates[str(L)].state_dict().items():
                    out[f"exits.{L}.gate.{name}"] = t.float()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what is present (norms, gates); missing gate tensors keep their init."""
        for L in self.exit_layers:
            for prefix, mod in ((f"exits.{L}.norm.", self.norms[str(L)]),
                                (f"exits.{L}.gate.", self.gates[str(L)])):
                sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if sd:
                    mod.load_state_dict(sd, strict=False)


def load_exit_tensors(model_dir) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    from offramp.ops.exits import EXITS_TENSORS

    path = Path(model_dir) / EXITS_TENSORS
    return load_file(str(path)) if path.is_file() else {}

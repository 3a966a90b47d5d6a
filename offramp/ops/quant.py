"""int8 weight-only quantisation of a stage's decoder layers (the planner's CPU option).

Each ``nn.Linear`` inside the decoder blocks becomes an :class:`Int8Linear`: weights as
int8 with one fp32 scale per output row (symmetric, ``scale = max|w_row| / 127``),
activations, biases, norms and the KV cache stay fp32. The embedding and the LM heads
(final and exit) stay in full precision: the exit decision reads their logits, and the
LM head is tied to the embedding on most small checkpoints.

What it buys is memory: a stage's layer weights take ~1/4 of fp32 (a memory-limited pool
fits 4x the layers). It does not buy speed with the kernels PyTorch 2.13 has on this
project's CPUs. Measured on the dev machine (2 threads, one 4096x11008 projection):
PyTorch's fused int8-weight matmul (``torch._weight_int8pack_mm``) takes 3.1x the fp32
matmul's time at 1 row, 4.8x at 4, 11x at 16, 29x at 64; dequantising the weight and
running the fp32 matmul takes 18x at 1 row, 6.5x at 16, 1.7x at 512. So a forward uses the
fused kernel for at most ``FUSED_MAX_ROWS`` rows (decode) and dequantises for more
(prefill). Quality is measured by ``offramp bench precision``; the planner picks int8
only when ``Constraints.allow_int8`` is set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


FUSED_MAX_ROWS = 8  # above this many rows, dequantise + fp32 matmul is faster (measured above)
_HAS_FUSED = hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None]).T + bias`` with ``q`` int8 (out, in)."""

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) fp32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "Int8Linear":
        """From an ``nn.Linear`` (weight (out, in)) or a GPT-2 ``Conv1D`` (weight (in, out))."""
        w = lin.weight.detach().float()
        if _is_conv1d(lin):
            w = w.t()
        w = w.contiguous()  # (N, K)
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (N,)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if lin.bias is None else lin.bias.detach().float()
        return cls(q, scales, bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight_q.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if _HAS_FUSED and x2.shape[0] <= FUSED_MAX_ROWS and x2.device.type == "cpu" and x2.dtype == torch.float32:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_q, self.scales)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype),
                         None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def quantize_linears_int8(module: nn.Module) -> None:
    """Replace every ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``) below ``module``
    in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) or _is_conv1d(child):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_linears_int8(child)

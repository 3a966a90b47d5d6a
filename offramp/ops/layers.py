"""One decoder block with switches for the Llama family and GPT-2, plus its batch metadata.

A step processes a ragged batch: row ``b`` brings ``n_b`` new positions starting at its
cached length ``p_b`` (prefill: the prompt; decode: 1; deferred backfill: the exited
positions plus the new one). Rows are padded to ``T = max n_b``; :class:`StepMeta`
holds everything every layer shares (where to write K/V, the attention mask, RoPE
tables), built once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from offramp.ops.checkpoint import ModelSpec


@dataclass
class StepMeta:
    slots: torch.Tensor  # (B,) long: KV slot of each row
    start: torch.Tensor  # (B,) long: positions already cached per row
    lengths: list[int]  # n_b per row
    positions: torch.Tensor  # (B, T) long
    write_rows: torch.Tensor  # (N,) row index b of each valid position
    write_cols: torch.Tensor  # (N,) column i of each valid position
    write_slots: torch.Tensor  # (N,) slot of each valid position
    write_pos: torch.Tensor  # (N,) cache position of each valid position
    kv_len: int  # keys to attend over: max(p_b + n_b)
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, None when plain full attention is exact
    slot_range: tuple[int, int] | None  # (s0, s1) when slots are s0..s1-1 in order: cache views, no gather
    cos: torch.Tensor | None = None  # (B, T, head_dim)
    sin: torch.Tensor | None = None

    @staticmethod
    def build(slots: list[int], start: list[int], lengths: list[int], device, window: int | None = None) -> "StepMeta":
        B, T = len(slots), max(lengths)
        start_t = torch.tensor(start, dtype=torch.long)
        positions = start_t[:, None] + torch.arange(T)[None, :]  # (B, T)
        valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
        rows, cols = valid.nonzero(as_tuple=True)
        slots_t = torch.tensor(slots, dtype=torch.long)
        kv_len = max(s + n for s, n in zip(start, lengths))
        uniform = T == 1 and all(s + 1 == kv_len for s in start)
        mask = None
        if not uniform or window is not None:
            keys = torch.arange(kv_len)[None, None, :]  # (1, 1, L)
            q_pos = positions.clamp_max(kv_len - 1)[:, :, None]  # padded queries see a valid prefix
            allowed = keys <= q_pos  # (B, T, L) causal, bottom-right aligned per row
            if window is not None:
                allowed &= keys > q_pos - window
            mask = allowed[:, None].to(device)
        contiguous = slots == list(range(slots[0], slots[0] + B))
        return StepMeta(
            slots=slots_t.to(device), start=start_t.to(device), lengths=list(lengths),
            positions=positions.to(device), write_rows=rows.to(device), write_cols=cols.to(device),
            write_slots=slots_t[rows].to(device), write_pos=positions[rows, cols].to(device),
            kv_len=kv_len, mask=mask, slot_range=(slots[0], slots[0] + B) if contiguous else None,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.is_llama:
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)


class Rope(nn.Module):
    """cos/sin tables for the configured RoPE type (frequencies from transformers' own
    init functions, so scaled variants match the reference exactly)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.hf_config
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "default":
            base = cfg.rope_parameters["rope_theta"]
            dim = spec.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scale = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None)
        t = torch.arange(spec.max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq.float())  # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def tables(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, hd)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, h, hd); cos/sin (B, T, hd)
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, hd
        # q, k and v in one matmul (the loader concatenates the checkpoint's three).
        self.qkv_proj = nn.Linear(d, (self.nh + 2 * self.nkv) * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=spec.out_bias)
        self.rope = spec.is_llama

    def _split(self, x: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        return q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)

    def kv(self, x: torch.Tensor, meta: StepMeta) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self._split(x)
        if self.rope:
            k = apply_rope(k, meta.cos, meta.sin)
        return k, v

    def forward(self, x: torch.Tensor, meta: StepMeta, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._split(x)  # (B, T, nh|nkv, hd)
        if self.rope:
            q, k = apply_rope(q, meta.cos, meta.sin), apply_rope(k, meta.cos, meta.sin)
        write_kv(k_cache, v_cache, k, v, meta)
        L = meta.kv_len
        if meta.slot_range is not None:
            s0, s1 = meta.slot_range
            keys, values = k_cache[s0:s1, :, :L], v_cache[s0:s1, :, :L]  # (B, nkv, L, hd) views
        else:
            keys, values = k_cache[meta.slots, :, :L], v_cache[meta.slots, :, :L]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=meta.mask, enable_gqa=self.nkv != self.nh
        )  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))


def write_kv(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, meta: StepMeta) -> None:
    """Scatter the valid new positions' K/V into the cache (slots, nkv, max_seq, hd).

    All three indices are advanced and broadcast ((N,1), (1,nkv), (N,1)), so this is one
    direct scatter; mixing a slice between advanced indices would copy the whole cache."""
    heads = torch.arange(k_cache.shape[1], device=k_cache.device)[None, :]  # (1, nkv)
    idx = (meta.write_slots[:, None], heads, meta.write_pos[:, None])
    k_cache.index_put_(idx, k[meta.write_rows, meta.write_cols].to(k_cache.dtype))  # values (N, nkv, hd)
    v_cache.index_put_(idx, v[meta.write_rows, meta.write_cols].to(v_cache.dtype))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, f = spec.hidden_size, spec.intermediate_size
        self.gated = spec.is_llama
        if self.gated:  # gate and up in one matmul (concatenated at load)
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=spec.mlp_bias)
        else:
            self.up_proj = nn.Linear(d, f, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=spec.mlp_bias)
        self.act = spec.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        h = self.up_proj(x)
        h = F.gelu(h, approximate="tanh") if self.act == "gelu_tanh" else F.gelu(h)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x)). Same shape for both families."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.post_norm = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x, meta: StepMeta, k_cache, v_cache):
        x = x + self.attn(self.input_norm(x), meta, k_cache, v_cache)
        return x + self.mlp(self.post_norm(x))

    def propagate_kv(self, x, meta: StepMeta, k_cache, v_cache) -> None:
        """CALM-style state propagation: K/V of this (skipped) layer from an exited state."""
        k, v = self.attn.kv(self.input_norm(x), meta)
        write_kv(k_cache, v_cache, k, v, meta)


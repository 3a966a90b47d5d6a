"""A pipeline stage: the contiguous layers it owns, and nothing else.

A stage builds only its layers and reads only their tensors (plus the embedding on the
first stage, final norm + LM head on the last, and the LM head + exit norm + gate where
its end boundary has an exit head). Checkpoint names are mapped here, once, to one
block layout (``layers.DecoderLayer``); GPT-2's fused Conv1D ``c_attn`` is split into
q/k/v at load time.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from offramp.errors import ConfigError
from offramp.ops import exits as ex
from offramp.ops.checkpoint import ModelSpec, WeightReader
from offramp.ops.layers import DecoderLayer, Rope, StepMeta, make_norm

# Stage precision -> the dtype its tensors are loaded in. int8 is weight-only: loaded in
# fp32, then the decoder blocks' linear layers are quantised (offramp.ops.quant).
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


class Stage(nn.Module):
    def __init__(self, spec: ModelSpec, layer_range: tuple[int, int], *, first: bool, last: bool,
                 exit_head: bool, gate: bool, task_dim: int = 0, num_tasks: int = 0):
        super().__init__()
        self.spec, self.layer_range, self.first, self.last = spec, layer_range, first, last
        d = spec.hidden_size
        if first:
            self.embed = nn.Embedding(spec.vocab_size, d)
            if not spec.is_llama:
                self.pos_embed = nn.Embedding(spec.max_position, d)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(*layer_range))
        self.has_exit = exit_head and not last
        if last:
            self.final_norm = make_norm(spec)
        if self.has_exit:
            self.exit_norm = make_norm(spec)
        if last or self.has_exit:
            self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        self.has_gate = gate and self.has_exit
        if self.has_gate:
            self.gate = ex.Gate(d, num_tasks, task_dim)

    def layer_bytes(self) -> int:
        tensors = [*self.layers.parameters(), *self.layers.buffers()]  # int8 weights are buffers
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor, meta: StepMeta, cache, skip: int = 0) -> torch.Tensor:
        """x: token ids (B, T) on the first stage, else hidden states (B, T, d) -> (B, T, d).

        ``skip``: enter at local layer ``skip`` (x is the hidden state after global layer
        ``start + skip - 1``); the skipped layers' KV is never read or written for these
        rows. Used while a split point moves (a replica then serves entries at its old and
        its new boundary); never on the first stage, whose input is token ids."""
        if self.first:
            h = self.embed(x)  # (B, T, d)
            if not self.spec.is_llama:
                h = h + self.pos_embed(meta.positions)
        else:
            h = x.to(self.lm_dtype)
        return self.run_layers(h, meta, cache, skip)

    def run_layers(self, h: torch.Tensor, meta: StepMeta, cache, skip: int = 0) -> torch.Tensor:
        """The decoder blocks alone (no embedding, no head): hidden (B, T, d) -> (B, T, d)."""
        if self.compiled is not None:
            if not getattr(_THREAD, "limits", False):  # dynamo's settings are per thread
                _compile_settings()
                _THREAD.limits = True
            return self.compiled(h, meta, cache, skip)
        return self._run_layers(h, meta, cache, skip)

    def _run_layers(self, h: torch.Tensor, meta: StepMeta, cache, skip: int = 0) -> torch.Tensor:
        for i in range(skip, len(self.layers)):
            h = self.layers[i](h, meta, cache.k[i], cache.v[i])
        return h

    compiled = None  # the decoder blocks under torch.compile, see compile_layers

    def compile_layers(self) -> None:
        """Run the decoder blocks under ``torch.compile`` (inductor; on CPU it builds C++
        kernels with the system compiler). Only the blocks: the embedding, the heads, the
        exit gate and the sampler stay eager, so the exit decision is never inside compiled
        code. Shapes are dynamic; dynamo still makes one graph per structural variant (a
        batch of 1 or more, one position or several, with or without an attention mask,
        contiguous KV slots or a gather), which :meth:`StageWorker.warm_up` compiles
        before the stage takes traffic. Pays where a pass is dispatch-bound (small models,
        small batches): see docs/benchmarks.md."""
        self.compiled = torch.compile(self._run_layers, dynamic=True)

    def propagate(self, h: torch.Tensor, meta: StepMeta, cache, skip: int = 0) -> None:
        """Approximate KV for skipped layers: every layer's K/V from the same exited state."""
        h = h.to(self.lm_dtype)
        for i in range(skip, len(self.layers)):
            self.layers[i].propagate_kv(h, meta, cache.k[i], cache.v[i])

    @property
    def lm_dtype(self) -> torch.dtype:
        """Activation/KV dtype: the layers' floating-point parameters' (norms; fp32 under
        int8 weight-only)."""
        return next(p.dtype for p in self.layers.parameters() if p.is_floating_point())

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, V) fp32
        return self.lm_head(self.final_norm(h)).float()

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.exit_norm(h)).float()

    def gate_prob(self, h: torch.Tensor, task_idx: torch.Tensor) -> torch.Tensor:
        """Tier-1 gate on the exit head's normed state, per row -> (B,) float32."""
        return self.gate.prob(self.exit_norm(h), task_idx)


def _layer_tensors(spec: ModelSpec, reader: WeightReader, i: int, j: int) -> dict[str, torch.Tensor]:
    """Checkpoint layer ``i`` -> state dict of local ``layers.{j}``."""
    out: dict[str, torch.Tensor] = {}
    p = f"layers.{j}."
    if spec.is_llama:
        src = f"model.layers.{i}."
        names = {"input_layernorm.weight": "input_norm.weight", "post_attention_layernorm.weight": "post_norm.weight"}
        for proj in ("q", "k", "v", "o"):
            names[f"self_attn.{proj}_proj.weight"] = f"attn.{proj}_proj.weight"
            names[f"self_attn.{proj}_proj.bias"] = f"attn.{proj}_proj.bias"
        for proj in ("gate", "up", "down"):
            names[f"mlp.{proj}_proj.weight"] = f"mlp.{proj}_proj.weight"
            names[f"mlp.{proj}_proj.bias"] = f"mlp.{proj}_proj.bias"
        for s, dst in names.items():
            if src + s in reader:
                out[p + dst] = reader.get(src + s)
        return _fuse(out, p)
    pre = "transformer." if "transformer.wte.weight" in reader else ""
    src = f"{pre}h.{i}."
    d = spec.hidden_size
    for ln, dst in (("ln_1", "input_norm"), ("ln_2", "post_norm")):
        out[p + dst + ".weight"] = reader.get(src + ln + ".weight")
        out[p + dst + ".bias"] = reader.get(src + ln + ".bias")
    w, b = reader.get(src + "attn.c_attn.weight"), reader.get(src + "attn.c_attn.bias")  # Conv1D (d, 3d)
    for k, name in enumerate(("q", "k", "v")):
        out[p + f"attn.{name}_proj.weight"] = w[:, k * d:(k + 1) * d].t().contiguous()
        out[p + f"attn.{name}_proj.bias"] = b[k * d:(k + 1) * d]
    for s, dst in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
        out[p + dst + ".weight"] = reader.get(src + s + ".weight").t().contiguous()
        out[p + dst + ".bias"] = reader.get(src + s + ".bias")
    return _fuse(out, p)


def _fuse(sd: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
    """Concatenate q/k/v (and gate/up) along the output dim: one matmul instead of three."""
    for kind in ("weight", "bias"):
        parts = [sd.pop(f"{p}attn.{n}_proj.{kind}", None) for n in ("q", "k", "v")]
        if parts[0] is not None:
            sd[f"{p}attn.qkv_proj.{kind}"] = torch.cat(parts)
        gate = sd.pop(f"{p}mlp.gate_proj.{kind}", None)
        if gate is not None:
            sd[f"{p}mlp.gate_up_proj.{kind}"] = torch.cat([gate, sd.pop(f"{p}mlp.up_proj.{kind}")])
    return sd


def _norm_tensors(spec: ModelSpec, reader: WeightReader, dst: str) -> dict[str, torch.Tensor]:
    if spec.is_llama:
        return {dst + ".weight": reader.get("model.norm.weight")}
    pre = "transformer." if "transformer.ln_f.weight" in reader else ""
    return {dst + ".weight": reader.get(pre + "ln_f.weight"), dst + ".bias": reader.get(pre + "ln_f.bias")}


def _embed_name(spec: ModelSpec, reader: WeightReader) -> str:
    if spec.is_llama:
        return "model.embed_tokens.weight"
    return reader.first_present("transformer.wte.weight", "wte.weight")


def load_stage(model_dir: str | Path, spec: ModelSpec, layer_range: tuple[int, int], *, first: bool, last: bool,
               exits: ex.ExitsConfig | None, dtype: str = "fp32", device: str = "cpu",
               reader: WeightReader | None = None) -> Stage:
    """Build a stage and load exactly the tensors it owns."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"stage dtype {dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    reader = reader or WeightReader(model_dir)
    start, end = layer_range
    # An exit head at the end boundary: from the exits file when it lists this layer;
    # without an exits file every boundary gets an untrained head (final-norm copy).
    exit_head = not last and (exits is None or end in exits.exit_layers)
    exit_tensors: dict[str, torch.Tensor] = {}
    if exit_head and exits is not None:
        from safetensors import safe_open

        with safe_open(str(Path(model_dir) / ex.EXITS_TENSORS), "pt") as f:
            present = set(f.keys())
            for name in ex.exit_tensor_names(end):
                if name in present:
                    exit_tensors[name.removeprefix(f"exits.{end}.")] = f.get_tensor(name)
    gate = exits is not None and exits.gate_enabled and "gate.fc.weight" in exit_tensors
    with torch.device("meta"):
        stage = Stage(spec, layer_range, first=first, last=last, exit_head=exit_head, gate=gate,
                      task_dim=exits.task_dim if exits else 0, num_tasks=len(exits.task_types) if exits else 0)

    sd: dict[str, torch.Tensor] = {}
    for j, i in enumerate(range(start, end)):
        sd.update(_layer_tensors(spec, reader, i, j))
    embed_name = _embed_name(spec, reader)
    if first:
        sd["embed.weight"] = reader.get(embed_name)
        if not spec.is_llama:
            sd["pos_embed.weight"] = reader.get(reader.first_present("transformer.wpe.weight", "wpe.weight"))
    if last:
        sd.update(_norm_tensors(spec, reader, "final_norm"))
    if stage.has_exit:
        if "norm.weight" in exit_tensors:
            sd["exit_norm.weight"] = exit_tensors["norm.weight"]
            if not spec.is_llama:
                sd["exit_norm.bias"] = exit_tensors["norm.bias"]
        else:
            sd.update(_norm_tensors(spec, reader, "exit_norm"))
        if gate:
            for name in ("gate.fc.weight", "gate.fc.bias", "gate.task_embedding.weight"):
                sd[name] = exit_tensors[name]
    if last or stage.has_exit:
        tied = spec.tie_word_embeddings or "lm_head.weight" not in reader
        sd["lm_head.weight"] = sd["embed.weight"] if (tied and first) else reader.get(embed_name if tied else "lm_head.weight")

    target = COMPUTE_DTYPES[dtype]
    sd = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    missing, unexpected = stage.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"checkpoint tensors do not match the {spec.model_type} layout: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}; is config.json from the same checkpoint?")
    if stage.first and "lm_head.weight" in sd and sd["lm_head.weight"] is sd["embed.weight"]:
        stage.lm_head.weight = stage.embed.weight  # keep tied: one copy in memory
    if dtype == "int8":
        from offramp.ops.quant import quantize_linears_int8

        quantize_linears_int8(stage.layers)
    if spec.is_llama:
        stage.rope = Rope(spec).to(device)
    return stage.eval()


_THREAD = threading.local()


def _compile_settings() -> None:
    """In the calling thread (dynamo's settings are thread-local): room for every graph
    variant (see :meth:`Stage.compile_layers`) times the entry layers a split move uses,
    and no duck shaping (two sizes that happen to be equal while a graph compiles, e.g. a
    prefill's length and the KV slot count, must not become one symbol: the next batch
    would recompile)."""
    import torch._dynamo
    import torch.fx.experimental._config as shapes

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)
    shapes.use_duck_shape = False

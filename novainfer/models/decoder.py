"""One decoder for Llama, Qwen2 and Qwen3: the families differ only in the switches of ModelConfig.

The same modules serve every tensor-parallel size: `tp` (a size-1 group by default) tells
the linear layers and the embedding which shard this rank holds (layers/linear.py).
"""

from __future__ import annotations

import torch
from torch import nn

from novainfer.distributed.parallel import TensorParallel
from novainfer.kernels import kernel_module
from novainfer.kernels.fp8 import FP8_DTYPE, calibrate_kv_scales
from novainfer.layers import fusion, linear
from novainfer.layers.activation import silu_and_mul
from novainfer.layers.attention import AttentionBackend, AttentionMetadata
from novainfer.layers.embedding import Embedding, LMHead
from novainfer.layers.linear import SINGLE, QKVLinear, RowParallelLinear, gate_up_linear
from novainfer.layers.norm import RMSNorm
from novainfer.layers.rotary import RotaryEmbedding, fused_qk_norm_rope_applies, qk_norm_rope
from novainfer.models.config import ModelConfig

# Each row-parallel output (the embedding rows, o_proj's, down_proj's) is summed over the
# ranks by the RMSNorm after it (layers/norm.py, `sum_over`): one kernel on the peer
# path, whose staging slot must differ from the previous call's. In call order, a forward
# pass uses EMBED, then ATTN, MLP for each layer (the last MLP's sum is the final norm's).
ATTN_SLOT, MLP_SLOT, EMBED_SLOT = 0, 1, 2

# transformers' separate tensors -> (our fused module, shard within it)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def rope_store_applies(q: torch.Tensor, kv_cache: torch.Tensor, backend: AttentionBackend,
                       meta: AttentionMetadata) -> bool:
    """Whether a step's q/k norms, rotary embedding and KV store run as one launch
    (kernels/rope_store.py): on CUDA, 16-bit, a cache in q's dtype or fp8, a backend whose
    attention of this step reads K/V from the cache (`attends_to_stored_kv`: Triton's, and
    cuDNN's except its pure prefills), not the fp8 calibration step. One-row steps take it
    under NOVAINFER_GEMV (the one-row kernels' switch), larger steps under
    NOVAINFER_FUSED_OPS=triton; both are the defaults. Otherwise the separate ops run: the
    q/k norms and rotary, then the backend's own store."""
    reads_stored = getattr(backend, "attends_to_stored_kv", None)
    if not (q.is_cuda and q.dtype in linear.GEMV_DTYPES and not meta.calibrate_kv_scales
            and kv_cache.dtype in (q.dtype, FP8_DTYPE)
            and reads_stored is not None and reads_stored(meta)):
        return False
    if q.shape[0] == 1:
        return linear.GEMV
    return fusion.FUSED_OPS == "triton" and not fusion.PLAIN_PYTORCH


class SelfAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias, tp
        )
        # This rank's heads.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        cfg.o_bias, tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.backend = backend
        self.tp = tp
        # An fp8 KV cache's scales (float32 [2]: k, v), a view of the worker's [layers, 2]
        # tensor, set by the worker (engine/worker.py); None with a cache in the model's dtype.
        self.kv_scales: torch.Tensor | None = None

    def forward(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention of `qkv` (qkv_proj's output: the layer runs it, after the norm)."""
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if rope_store_applies(q, kv_cache, self.backend, meta):
            norm = () if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight,
                                                   self.q_norm.eps)
            q = kernel_module("rope_store").rope_store(
                q, k, v, positions, self.rotary.cos, self.rotary.sin, kv_cache,
                meta.slot_mapping, *norm, kv_scales=self.kv_scales)
            out = self.backend.attend(q, kv_cache, meta, self.scale, self.kv_scales)
        else:
            q, k = self._norm_rope(q, k, positions)
            if meta.calibrate_kv_scales:
                # Every rank holds other KV heads: the max over ranks, before the first
                # store, gives each layer one scale, and the cache of a single rank holding
                # every head.
                calibrate_kv_scales(k, v, self.kv_scales)
                self.tp.all_reduce_max(self.kv_scales)
            out = self.backend.forward(q, k, v.contiguous(), kv_cache, meta, self.scale,
                                       self.kv_scales)
        # A partial sum with tensor parallelism: the next norm sums it (DecoderLayer).
        return self.o_proj(out.view(-1, self.num_heads * self.head_dim), reduce=False)

    def _norm_rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's q/k norms (if the model has them), then the rotary embedding."""
        if self.q_norm is not None and fused_qk_norm_rope_applies(q):
            return qk_norm_rope(q, k, positions, self.q_norm.weight, self.k_norm.weight,
                                self.q_norm.eps, self.rotary.cos, self.rotary.sin)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary(positions, q, k)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = gate_up_linear(cfg.hidden_size, size, cfg.mlp_bias, tp)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        """down_proj(act) for act = silu_and_mul(gate_up_proj's output) (the layer runs both,
        after the norm: one kernel at batch 1). A partial sum with tensor parallelism: the
        next norm sums it (DecoderLayer)."""
        return self.down_proj(act, reduce=False)


def norm_then_linear(
    norm: RMSNorm, layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
    bias: torch.Tensor | None, silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(norm's output), the residual stream) for a norm of the residual stream
    (RMSNorm.forward's arguments) and a linear layer: one kernel for a batch-1 row
    (kernels/gemv.py) when no all-reduce and no pending bias sit between them. `silu_mul`
    (gate/up): silu_and_mul of the layer's output, in that kernel too."""
    if (bias is None and not (norm.sum_over is not None and norm.sum_over.enabled)
            and layer.takes_prologue(hidden)):
        return layer.after_norm(hidden, residual, norm.weight, norm.eps, silu_mul)
    hidden, residual = norm(hidden, residual, bias)
    out = layer(hidden)
    return (silu_and_mul(out) if silu_mul else out), residual


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
        tp: TensorParallel, first: bool = False,
    ) -> None:
        super().__init__()
        # The first layer's input is the embedding's rows: its own slot (see ATTN_SLOT).
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, tp,
                                       EMBED_SLOT if first else MLP_SLOT)
        self.self_attn = SelfAttention(cfg, rotary, backend, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, tp,
                                                ATTN_SLOT)
        self.mlp = MLP(cfg, tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden`: the previous layer's MLP output (or the embedding rows, residual None),
        a partial sum over the ranks still missing `bias` (its producer's pending bias);
        returns this layer's MLP output, likewise, and the residual stream."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = norm_then_linear(self.input_layernorm, attn.qkv_proj, hidden,
                                         residual, bias)
        hidden = attn(positions, qkv, kv_cache, meta)
        act, residual = norm_then_linear(self.post_attention_layernorm, mlp.gate_up_proj,
                                         hidden, residual, attn.o_proj.pending_bias,
                                         silu_mul=True)
        return mlp(act), residual


class DecoderModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, tp)
        # One rotary table shared by all layers (it is a buffer, not a weight).
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary, backend, tp, first=i == 0) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, tp, MLP_SLOT)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden, residual, bias = self.embed_tokens(input_ids, reduce=False), None, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, bias)
            bias = layer.mlp.down_proj.pending_bias
        hidden, _ = self.norm(hidden, residual, bias)
        return hidden


class CausalLM(nn.Module):
    """Decoder plus LM head. `forward` returns hidden states; `compute_logits` the vocab scores."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.model = DecoderModel(cfg, max_positions, backend, tp)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Vocabulary scores of `hidden`'s rows; with tensor parallelism a collective (every
        rank calls it) whose result only rank 0 receives (the others get None)."""
        return self.tp.gather_last_dim(self.lm_head(hidden))

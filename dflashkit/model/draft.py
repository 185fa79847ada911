"""The DFlash draft: Qwen3-style decoder layers that attend to the target's hidden states.

One forward pass drafts many blocks at once. Inputs:
- `target_hidden` [b, S, n*H]: the target's hidden states at the `target_layer_ids`, concatenated in id order. They
  are fused once, `context = hidden_norm(fc(target_hidden))`, and the same fused context feeds every layer.
- `block_embeds` [b, Q, H]: the embeddings (the target's `embed_tokens`) of the blocks, Q = blocks x block_size,
  each block `[anchor, mask, ..., mask]`.
- positions of the context (`0..S-1` in training) and of the blocks (`anchor + 0..B-1`), for RoPE.
- an attention mask over keys `[context ; blocks]` for the block queries (see `masks.py`).

KV injection: in every layer the keys and values are `[k/v_proj(context) ; k/v_proj(block)]` while the queries come
from the block alone. The context is not passed through the layer's input norm (it was normed by `hidden_norm`) and
is not updated from layer to layer, exactly as vLLM precomputes it once into each layer's KV cache.

The module's parameter names are the exported safetensors names (`fc.weight`, `hidden_norm.weight`, `norm.weight`,
`layers.N.self_attn.q_proj.weight`, ...). Embeddings and lm_head are not part of it: they are the target's
(`target.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dflashkit.model.config import DFlashConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as Qwen3 does, then scale in the input dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * normed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE; x is [b, heads, T, d], cos/sin [b, T, d]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.head_dim).transpose(1, 2)  # [b, n, T, d]

    def forward(self, block: torch.Tensor, context: torch.Tensor, rope_block, rope_context, mask) -> torch.Tensor:
        b, q_len, _ = block.shape
        q = rotate(self.q_norm(self._heads(self.q_proj(block), self.num_heads)), *rope_block)
        kv_in = torch.cat([context, block], dim=1)
        k = self._heads(self.k_proj(kv_in), self.num_kv_heads)
        k = self.k_norm(k)
        k = torch.cat([rotate(k[:, :, : context.shape[1]], *rope_context), rotate(k[:, :, context.shape[1]:], *rope_block)],
                      dim=2)
        v = self._heads(self.v_proj(kv_in), self.num_kv_heads)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Non-causal attention under `mask`: a dense bool tensor [b, 1, Q, K] (SDPA) or a flex_attention BlockMask."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    from dflashkit.model.masks import flex_attention

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class MLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # Training option (not part of the config): keep only the layer's inputs, recompute the rest in backward.
        # Inside forward, so FSDP's per-layer hooks stay outside the recomputed region and parameter names are unchanged.
        self.activation_checkpointing = False

    def forward(self, x, context, rope_block, rope_context, mask):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, rope_block, rope_context, mask, use_reentrant=False)
        return self._forward(x, context, rope_block, rope_context, mask)

    def _forward(self, x, context, rope_block, rope_context, mask):
        x = x + self.self_attn(self.input_layernorm(x), context, rope_block, rope_context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraft(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        self.config = cfg
        self.fc = nn.Linear(cfg.num_fused_layers * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # transformers' rope covers every rope_type (YaRN for long-context targets); its inv_freq is not saved.
        self.rotary = Qwen3RotaryEmbedding(cfg.to_hf_config())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _compute_dtype(self, x: torch.Tensor) -> torch.Tensor:
        # Dumps are bf16 and the frozen embeddings may be fp32; under autocast the matmuls cast for themselves.
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.fc.weight.dtype)

    def fuse(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[.., n*H] target hidden states -> [.., H] context the layers attend to."""
        return self.hidden_norm(self.fc(target_hidden))

    def forward(self, target_hidden, block_embeds, context_positions, block_positions, mask, *,
                context_index: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the final-normed hidden states of the block tokens, [b, Q, H]; logits are the target's lm_head
        applied to them. With `context_index` [N], `target_hidden` comes packed, [N, n*H]: a batch's real positions
        only, `context_index` their places in the [b * S] layout of `context_positions`. They are fused as they are
        and padded after, n times narrower, so the padded batch never exists at n*H wide (the fc would keep it for
        backward); padding gets a zero context, what fc and hidden_norm make of zero states."""
        context = self.fuse(self._compute_dtype(target_hidden))
        if context_index is not None:
            b, s = context_positions.shape
            context = context.new_zeros(b * s, context.shape[-1]).index_copy(0, context_index, context).view(b, s, -1)
        x = self._compute_dtype(block_embeds)
        rope_context = self.rotary(x, context_positions)
        rope_block = self.rotary(x, block_positions)
        for layer in self.layers:
            x = layer(x, context, rope_block, rope_context, mask)
        return self.norm(x)

    # -- drafting: what differs between draft kinds (dspark.py overrides these) ---------------------------------

    @staticmethod
    def num_drafts(block_size: int) -> int:
        """Tokens a block of `block_size` slots drafts: slot 0 is the given anchor, slot k predicts x[a+k]."""
        return block_size - 1

    def teacher_forced_logits(self, inputs: tuple, previous_ids: torch.Tensor, lm_head: torch.Tensor,
                              block_size: int) -> torch.Tensor:
        """[b, N, B-1, V]: every block's draft logits in one pass, as training computes them. `inputs` are forward's
        arguments; `previous_ids` (the true token before each slot's prediction) is unused: DFlash slots draft
        independently."""
        hidden = self(*inputs)
        logits = (hidden @ lm_head.T.to(hidden.dtype)).float()
        return logits.view(logits.shape[0], -1, block_size, logits.shape[-1])[:, :, 1:]

    def propose(self, inputs: tuple, anchor: int, lm_head: torch.Tensor, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """One served block (forward's `inputs` for one block): (logits [B-1, V], drafts [B-1]), all in parallel."""
        hidden = self(*inputs)
        logits = (hidden[0, 1:] @ lm_head.T.to(hidden.dtype)).float()
        return logits, pick(logits)

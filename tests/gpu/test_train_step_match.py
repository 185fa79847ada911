"""On CUDA: the default training step (`step: fast`: flex_attention, bf16 autocast, chunked lm_head/CE with the
lm_head gradient in forward, compiled layers and chunks) follows the plain one (`step: plain`, dense SDPA, fp32, the
whole [rows, vocab] logits at once) step for step; so do the variants (activation checkpointing, fp32, the plain step
in bf16).

Tolerances, relative per step. fp32 (only the attention kernel and compilation differ): 1e-3; kernels reorder sums
and 20 AdamW steps amplify that little. bf16: 1e-2. bf16 keeps 8 significant bits (0.4% per rounding), but the loss
is a mean over ~1,900 rows, so rounding noise mostly averages out; AdamW's normalized updates turn small gradient
differences into lr-sized weight moves, so the curves drift apart slowly. The same comparison on the CPU (dense
attention, H 256, vocab 8192, bf16 autocast + chunks + checkpointing vs fp32) stayed under 0.09% over 20 steps, and
chunking or checkpointing alone changed nothing (bitwise). A wrong mask, a dropped row or a mis-scaled loss moves the
loss by far more than 1%.
"""
from __future__ import annotations

import pytest
import torch

from dflashkit.model import DFlashConfig, TargetHead
from dflashkit.train.config import DataSpec, DraftSpec, LossSpec, TrainConfig
from dflashkit.train.distributed import Dist
from dflashkit.train.loop import Trainer, uses_bf16
from dflashkit.train.synthetic import synthetic_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 20


def config() -> DFlashConfig:
    # Real head size and vocabulary (Qwen3's), fewer and narrower layers.
    return DFlashConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=128, intermediate_size=3072, vocab_size=151936, target_layer_ids=[1, 9, 17, 25, 33],
                        num_target_layers=36, mask_token_id=151935, block_size=16)


def batches(cfg, n=4, micro=2, seq=1024, anchors=64):
    # Tokens from a 1000-id slice of the vocabulary: a pattern the draft can pick up within 20 steps.
    return [synthetic_batch(micro=micro, seq=seq, width=cfg.num_fused_layers * cfg.hidden_size, anchors=anchors,
                            vocab=1000, block_size=cfg.block_size, seed=k) for k in range(n)]


def loss_curve(cfg, **options) -> list[float]:
    """`options`: TrainConfig fields (step, attention, precision, activation_checkpointing) and chunk_rows; the
    rest is the recipe's default."""
    chunk_rows = options.pop("chunk_rows", LossSpec.vocab_chunk_rows)
    tc = TrainConfig(target_model="unused", output_dir="unused", **options,
                     model=DraftSpec(num_layers=cfg.num_hidden_layers, block_size=cfg.block_size,
                                     mask_token_id=cfg.mask_token_id),
                     data=DataSpec(dump_dirs=["unused"]), loss=LossSpec(vocab_chunk_rows=chunk_rows))
    g = torch.Generator().manual_seed(1)
    h, v = cfg.hidden_size, cfg.vocab_size
    d = Dist(device=torch.device("cuda"))
    dtype = torch.bfloat16 if uses_bf16(tc, d) else torch.float32  # as the trainer loads the head
    head = TargetHead((torch.randn(v, h, generator=g) * 0.02).to(dtype), (torch.randn(v, h, generator=g) * 0.02).to(dtype),
                      torch.ones(h, dtype=dtype), 1e-6)
    trainer = Trainer(tc, d, "pre_norm", cfg, head)
    data = [{k: t.pin_memory() for k, t in b.items()} for b in batches(cfg)]
    return [trainer.read(trainer.step([data[s % len(data)]], lr=3e-4))["loss"] for s in range(STEPS)]


@pytest.fixture(scope="module")
def plain() -> list[float]:
    return loss_curve(config(), step="plain", attention="sdpa", precision="fp32", chunk_rows=10**9)


@pytest.mark.parametrize("options, rtol", [
    ({}, 1e-2),  # the default step, as every recipe trains
    ({"activation_checkpointing": True}, 1e-2),
    ({"precision": "fp32", "activation_checkpointing": True, "chunk_rows": 512}, 1e-3),
    ({"step": "plain", "chunk_rows": 512}, 1e-2)])  # the plain step's own bf16 + flex + chunks
def test_fast_step_follows_the_plain_step(plain, options, rtol):
    fast = loss_curve(config(), **options)
    assert plain[-1] < plain[0] - 0.3  # the curve moves: the comparison means something
    gaps = [abs(f - p) / p for f, p in zip(fast, plain)]
    assert max(gaps) <= rtol, f"largest relative gap {max(gaps):.2e} at step {gaps.index(max(gaps))}"

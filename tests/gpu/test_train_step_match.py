"""On CUDA: the fast training step (flex_attention, bf16 autocast, chunked lm_head/CE, compiled layers, activation
checkpointing) follows the plain one (dense SDPA, fp32, the whole [rows, vocab] logits at once) step for step.

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
from dflashkit.train.data import anchor_generator, collate, sample_anchors
from dflashkit.train.distributed import Dist
from dflashkit.train.loop import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 20


def config() -> DFlashConfig:
    # Real head size and vocabulary (Qwen3's), fewer and narrower layers.
    return DFlashConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=128, intermediate_size=3072, vocab_size=151936, target_layer_ids=[1, 9, 17, 25, 33],
                        num_target_layers=36, mask_token_id=151935, block_size=16)


def batches(cfg, n=4, micro=2, seq=1024, anchors=64, pin=True):
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        items = []
        for i in range(micro):
            loss_mask = torch.zeros(seq, dtype=torch.uint8)
            loss_mask[seq // 4:] = 1
            a, valid = sample_anchors(loss_mask, anchors, anchor_generator(k, 0, i))
            # Tokens from a 1000-id slice of the vocabulary: a pattern the draft can pick up within 20 steps.
            items.append({"input_ids": torch.randint(0, 1000, (seq,), generator=g),
                          "aux_hidden_states": torch.randn(seq, cfg.num_fused_layers * cfg.hidden_size,
                                                           generator=g).to(torch.bfloat16),
                          "loss_mask": loss_mask, "anchors": a, "anchor_valid": valid, "length": torch.tensor(seq)})
        out.append({k: t.pin_memory() if pin else t for k, t in collate(items).items()})
    return out


def loss_curve(cfg, *, attention, precision, chunk_rows, compile=False, checkpointing=False, grad_in_forward=False,
               device="cuda", **batch_shape) -> list[float]:
    tc = TrainConfig(target_model="unused", output_dir="unused", attention=attention, precision=precision,
                     compile=compile, activation_checkpointing=checkpointing,
                     model=DraftSpec(num_layers=cfg.num_hidden_layers, block_size=cfg.block_size,
                                     mask_token_id=cfg.mask_token_id),
                     data=DataSpec(dump_dirs=["unused"]),
                     loss=LossSpec(vocab_chunk_rows=chunk_rows, lm_head_grad_in_forward=grad_in_forward))
    g = torch.Generator().manual_seed(1)
    h, v = cfg.hidden_size, cfg.vocab_size
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16  # as the trainer loads the head
    head = TargetHead((torch.randn(v, h, generator=g) * 0.02).to(dtype), (torch.randn(v, h, generator=g) * 0.02).to(dtype),
                      torch.ones(h, dtype=dtype), 1e-6)
    trainer = Trainer(tc, Dist(device=torch.device(device)), "pre_norm", cfg, head)
    data = batches(cfg, pin=device == "cuda", **batch_shape)
    return [trainer.step([data[s % len(data)]], lr=3e-4)["loss"] for s in range(STEPS)]


@pytest.fixture(scope="module")
def plain() -> list[float]:
    return loss_curve(config(), attention="sdpa", precision="fp32", chunk_rows=10**9)


@pytest.mark.parametrize("precision, options, rtol", [
    ("fp32", {"compile": True, "checkpointing": True}, 1e-3),
    ("bf16", {"compile": True}, 1e-2),
    ("bf16", {"checkpointing": True}, 1e-2),
    ("bf16", {"compile": True, "grad_in_forward": True}, 1e-2)])
def test_fast_step_follows_the_plain_step(plain, precision, options, rtol):
    fast = loss_curve(config(), attention="flex", precision=precision, chunk_rows=512, **options)
    assert plain[-1] < plain[0] - 0.3  # the curve moves: the comparison means something
    gaps = [abs(f - p) / p for f, p in zip(fast, plain)]
    assert max(gaps) <= rtol, f"largest relative gap {max(gaps):.2e} at step {gaps.index(max(gaps))}"

"""The training recipe: one dataclass tree, loaded from `--config` YAML plus dotted overrides (dflashkit.config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DraftSpec:
    """The draft's shape. Dims left null are copied from the target's decoder layer (hidden size always is: the
    draft shares the target's embeddings and lm_head). Target layer ids come from the dump's meta.json."""
    # "dflash", or "dspark": the DFlash backbone plus a Markov head and a confidence head (dflashkit/model/dspark.py);
    # a DSpark block of block_size slots drafts block_size tokens, a DFlash one block_size - 1.
    kind: Literal["dflash", "dspark"] = "dflash"
    num_layers: int = 5
    block_size: int = 16
    mask_token_id: int = -1  # required: a token id the chats never contain (e.g. Qwen3's <|MASK|> slot 151669)
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    # DSpark only: the Markov head's rank, and whether the confidence head is trained (reading the Markov embedding).
    markov_rank: int = 256
    confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # Target decoder layer ids, one per draft layer: a fresh run starts draft layer i as target layer ids[i] (its
    # attention, QK-norm when the target has one, MLP and both norms; fc, hidden_norm and heads stay random).
    # Empty: random layers. Ignored on resume (the checkpoint holds the weights).
    init_from_target_layers: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.mask_token_id < 0:
            raise ValueError("model.mask_token_id must be set (a token id below the vocabulary size)")
        if self.num_layers < 1 or self.block_size < 2:
            raise ValueError("model.num_layers must be >= 1 and model.block_size >= 2")
        ids = self.init_from_target_layers
        if ids and len(ids) != self.num_layers:
            raise ValueError(f"model.init_from_target_layers {ids} has {len(ids)} ids, model.num_layers is "
                             f"{self.num_layers}: one target layer per draft layer")
        if any(i < 0 for i in ids):
            raise ValueError(f"model.init_from_target_layers {ids}: layer ids must be >= 0")


@dataclass
class OnlineSpec:
    """`data.source: online`: train straight from generate-stage shards, the frozen target (HF, no grad) computing
    each micro-batch's hidden states on the trainer's GPU (train/online.py). The tokenization is the dump's own."""
    inputs: list[str] = field(default_factory=list)  # generate output dirs or .jsonl files (what the dump reads)
    chat_template: str = ""  # as the dump's --chat-template (name or path); "": the tokenizer's own, replies located
    end_of_turn: str = ""  # as the dump's --end-of-turn, for located replies; "": the one the template writes
    tokenizer: str = ""  # default: target_model
    length_policy: Literal["skip", "truncate"] = "skip"  # a conversation over data.max_seq_len: bad record, or cut
    target_layer_ids: list[int] = field(default_factory=list)  # empty: the dump's default spread
    num_target_layers: int = 5  # the spread's size when target_layer_ids is empty (the dump's --num-draft-layers)
    prefetch: int = 2  # micro-batches whose target forward is queued ahead on a side CUDA stream
    # What one more target forward costs, in padded tokens: a micro-batch's rows run in length groups that minimize
    # padded tokens + this per forward (train/online.py, length_groups). Small targets: large (a forward's fixed
    # cost is many tokens' compute); a large target's is a few hundred tokens. docs/TRAINING.md has the measurement.
    forward_cost_tokens: int = 16384
    # torch.compile the target's forward (dynamic shapes, compiled once): fuses its per-layer elementwise kernels,
    # which dominate a small target's forward. Off until timed on a GPU (bench/online_vs_offline.py --compile-target).
    compile_target: bool = False
    # CUDA only: replay the target's forward as CUDA graphs, one per padded shape (rows up to a power of two, length up
    # to a multiple of 256), captured when first seen: the host queues a forward in microseconds instead of launching
    # its kernels one by one from Python (train/online.py, GraphedForward). Off until timed on a GPU.
    cuda_graphs: bool = False
    # Generate shards whose records are the held-out set (instead of data.heldout_records drawn from the inputs):
    # the same text for runs on different inputs, e.g. training sets of different sizes.
    heldout_inputs: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.num_target_layers < 1 or self.prefetch < 0 or self.forward_cost_tokens < 0:
            raise ValueError("data.online.num_target_layers must be >= 1, data.online.prefetch and "
                             "data.online.forward_cost_tokens >= 0")


@dataclass
class DataSpec:
    source: Literal["dump", "online"] = "dump"  # dump: hidden-state dumps; online: generate shards + the target
    dump_dirs: list[str] = field(default_factory=list)
    online: OnlineSpec = field(default_factory=OnlineSpec)
    max_seq_len: int = 8192  # longer records are cut here
    num_anchors: int = 512  # blocks per sequence (fewer where the loss mask has fewer positions)
    micro_batch_size: int = 1
    num_workers: int = 2
    # Batches of similar lengths: 0 takes records in the seeded shuffle as they come; K > 0 cuts the shuffle into
    # windows of K global batches and sorts each window by record size (a dump record's bytes; a generated record's
    # token counts, else its line's bytes) before cutting it into global batches again, in a seeded order within the
    # window. A micro-batch's rows are then of similar length, so less padding is computed (the target's forward
    # online, the draft's context), and the ranks' micro-batches of a step are alike. Each epoch still takes every
    # record once. Off by default: on SmolLM2 it cost 0.125 held-out tau and was no faster (BENCHMARKS.md).
    group_by_length: int = 0
    # Records kept out of training (a fixed pseudo-random choice, the same for every seed) and scored at every
    # checkpoint on text the draft never saw: loss, accuracy and the served tau (every anchor of the first
    # `heldout_anchors` answer positions per record, walked as served decoding steps through them).
    heldout_records: int = 0
    heldout_anchors: int = 512
    # Unreadable records (a torn .pt, a template error online) are skipped with one error line each and counted;
    # past this many in one run, training stops with one line (exit 1). -1: never stop.
    max_bad_records: int = 100

    def validate(self) -> None:
        if self.source == "dump" and not self.dump_dirs:
            raise ValueError("data.dump_dirs is empty")
        if self.source == "online":
            if self.dump_dirs:
                raise ValueError("data.source=online reads data.online.inputs; data.dump_dirs must be empty")
            if not self.online.inputs:
                raise ValueError("data.source=online needs data.online.inputs (generate output dirs or files)")
        self.online.validate()
        if self.max_bad_records < -1:
            raise ValueError("data.max_bad_records must be >= 0, or -1 for no limit")
        if min(self.max_seq_len - 1, self.num_anchors, self.micro_batch_size, self.heldout_anchors) < 1 \
                or self.num_workers < 0:
            raise ValueError("data sizes must be positive (data.max_seq_len at least 2: an anchor and a token "
                             "after it)")
        if self.heldout_records < 0 or self.group_by_length < 0:
            raise ValueError("data.heldout_records and data.group_by_length must be >= 0")
        if self.online.heldout_inputs and (self.source != "online" or self.heldout_records):
            raise ValueError("data.online.heldout_inputs is the held-out set of data.source=online; "
                             "data.heldout_records must then be 0")


@dataclass
class OptimSpec:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs x steps per epoch

    def validate(self) -> None:
        if self.grad_accum < 1 or self.epochs < 1 or self.max_steps < 0 or self.warmup_steps < 0:
            raise ValueError("optim.grad_accum and optim.epochs must be >= 1; steps must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("optim.betas must be two values in [0, 1)")
        # AdamW's own refusals would come as a traceback after the model is built: said here, with the key.
        if not (self.lr > 0 and self.eps > 0 and self.weight_decay >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("lr and eps must be > 0, weight_decay >= 0, 0 <= min_lr_ratio <= 1")


@dataclass
class LossSpec:
    # "ce": cross-entropy with position weights exp(-(k-1)/decay_gamma) (DFlash); "dpace": D-PACE weights, the
    # gradient of the expected accepted length (see loss.py).
    kind: Literal["ce", "dpace"] = "ce"
    decay_gamma: float = 7.0  # 0 = equal weights; DFlash uses 7 for B=16, 5 for B=10, 4 for B=8
    dpace_alpha: float = 0.5  # D-PACE smoothing: q -> (1 - alpha) q + alpha
    kd_weight: float = 0.0  # > 0 adds KD (soft cross-entropy) against the target's logits
    vocab_chunk_rows: int = 4096  # rows of [rows, vocab] logits alive at once
    # DSpark: weight of the confidence head's binary cross-entropy (summed over counted slots) beside the block loss.
    confidence_weight: float = 0.1

    def validate(self) -> None:
        if self.decay_gamma < 0 or not 0 <= self.dpace_alpha <= 1 or self.kd_weight < 0 or self.vocab_chunk_rows < 1 \
                or self.confidence_weight < 0:
            raise ValueError("loss: decay_gamma >= 0, 0 <= dpace_alpha <= 1, kd_weight >= 0, vocab_chunk_rows >= 1")


@dataclass
class ProfileSpec:
    # torch.profiler over `steps` optimizer steps from step `start` (as logged, from 1; 0 = off): a Chrome trace and
    # a table of host and device time per labelled part and per op in output_dir/profile/ (dflashkit/train/profile.py).
    start: int = 0
    steps: int = 3

    def validate(self) -> None:
        if self.start < 0 or self.steps < 1:
            raise ValueError("profile.start must be >= 0 and profile.steps >= 1")


@dataclass
class TrainConfig:
    # HF folder of the target: only embed_tokens, lm_head and the final norm are read (and the decoder layers of
    # model.init_from_target_layers)
    target_model: str = ""
    output_dir: str = ""
    model: DraftSpec = field(default_factory=DraftSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    profile: ProfileSpec = field(default_factory=ProfileSpec)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    attention: Literal["auto", "flex", "sdpa"] = "auto"  # auto: flex_attention on CUDA, dense SDPA elsewhere
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP2 from fsdp_min_hidden_size up, else DDP
    # At hidden 4096 (qwen3-8b preset, 2 and 4 H200s) FSDP2 steps 4-7% faster than DDP and holds half the memory
    # (BENCHMARKS.md, "Multi-GPU scaling"); below that its per-layer all-gathers are not measured to pay.
    fsdp_min_hidden_size: int = 4096
    # Recompute each draft layer's activations in backward instead of keeping them: ~1/3 more layer FLOPs for a
    # fraction of the activation memory (long sequences, big micro-batches). Same losses up to fp rounding.
    activation_checkpointing: bool = False
    # "fast": on CUDA each draft layer and the lm_head/CE chunks are torch.compiled (the first steps compile), and
    # each chunk's lm_head gradient is computed with its logits in forward instead of recomputing the chunk in
    # backward (one vocab matmul fewer; no [rows, vocab] fp32 copies in backward). "plain": eager, every chunk
    # recomputed in backward: the reference the fast step is tested against (tests/gpu/test_train_step_match.py),
    # for debugging. Same losses up to rounding.
    step: Literal["fast", "plain"] = "fast"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True

    def validate(self) -> None:
        if not self.target_model or not self.output_dir:
            raise ValueError("target_model and output_dir must be set")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every, keep_checkpoints and log_every must be >= 1")
        for part in (self.model, self.data, self.optim, self.loss, self.profile):  # defaults are not checked alone
            part.validate()

"""`data.source: online`: train from generate-stage shards, the frozen target computing the hidden states per step.

- Records: every line of the generate shards in `data.online.inputs` (dirs or .jsonl files, either record layout:
  what the dump reads). They are indexed once (file, byte offset, id) and sorted by id within each input, the order
  of a dump dir of the same records, so an online run and an offline run of the same records take the same batches
  and anchors. Only the index is held in memory; a record's line is read when its batch is built.
- Tokenization: the dump's own (`dflashkit.dump.records` to read a record, `tokenize_conversation` with the
  training template and the record's `generation.chat_template_kwargs`: the thinking mode replayed), in the
  DataLoader's workers. A record the dump would not write (bad JSON, template error, over-length under
  `length_policy: skip`, an all-zero mask) is a bad record: skipped with one error line and counted (data.py).
- Hidden states: the HF target (dflashkit.dump.hf_backend, the dump's reference backend), frozen, in bf16 on CUDA
  (fp32 on the CPU), on each rank's own device, under no_grad. Each micro-batch's rows run in groups of similar
  length, each forward cut to its longest row, the states packed as the loader packs a dump's; target layer k is `hidden_states[k + 1]`, the final state (KD) the last decoder layer's output before the
  final norm, as in a dump. The target's embed_tokens / lm_head / final norm are shared with the draft's head.
- Prefetch: `prefetch` micro-batches ahead, the target's forward is queued on a side CUDA stream while the step
  runs, its inputs copied from pinned memory; the tokenization runs in the loader's workers. `cuda_graphs` replays
  the forward as CUDA graphs of a few padded shapes (GraphedForward), so queueing it costs the host next to nothing.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from dflashkit.config import ConfigError
from dflashkit.dump.format import dtype_name
from dflashkit.dump.records import generated_files, generated_record, record_messages
from dflashkit.formats import BadRecord, parse_line
from dflashkit.io import require_local_model
from dflashkit.model import TargetHead
from dflashkit.model.layers import (
    FINAL_STATE,
    check_target_layer_ids,
    default_target_layer_ids,
    hidden_size,
    num_hidden_layers,
)
from dflashkit.shards import UnusableInput
from dflashkit.train.data import AnchoredDataset, BadRecordError
from dflashkit.train.profile import TARGET_FORWARD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LineRef:
    """Where one generated record lives."""
    file: int  # index into OnlineIndex.files
    offset: int
    lineno: int
    id: str
    size: int  # its length, for data.group_by_length (`record_size`)


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(offset, line number, bytes) of every non-blank line."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield offset, lineno, raw
            offset += len(raw)


def record_size(obj, raw: bytes) -> int:
    """A record's length for data.group_by_length, known without tokenizing it: the tokens the generate stage
    counted (its last turn's prompt and completion: the whole conversation as served), else its line's bytes / 4
    (0.19-0.30 tokens a byte over ShareGPT with SmolLM2's tokenizer; grouping needs only the order)."""
    generation = obj.get("generation") if isinstance(obj, dict) else None
    turns = generation.get("turns") if isinstance(generation, dict) else None
    last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
    counts = last.get("prompt_tokens"), last.get("completion_tokens")
    if all(isinstance(c, int) and c >= 0 for c in counts):
        return counts[0] + counts[1]
    return len(raw) // 4


def index_generated(inputs: list[str]) -> tuple[list[Path], list[LineRef]]:
    """Every record of the inputs, sorted by id within each input (the order of a dump dir of the same records).
    A line that cannot be parsed keeps its place under its source name and becomes a bad record when read."""
    files: list[Path] = []
    refs: list[LineRef] = []
    for spec in inputs:
        found = []
        for path in generated_files(spec):
            if path.suffix != ".jsonl":
                raise ConfigError(f"{path}: online training reads .jsonl generate shards")
            files.append(path)
            for offset, lineno, raw in _lines(path):
                rec = generated_record(*parse_line(raw, f"{path.name}:{lineno}"), len(found))
                found.append(LineRef(len(files) - 1, offset, lineno, rec.id, record_size(rec.record, raw)))
        refs += sorted(found, key=lambda r: r.id + ".pt")  # as list_dump_records sorts `<id>.pt`
    if not refs:
        raise UnusableInput(f"data.online.inputs {inputs} hold no records")
    return files, refs


class OnlineDataset(AnchoredDataset):
    """Tokenized generated records (no hidden states: the target adds them per micro-batch on the device)."""

    def __init__(self, files: list[Path], refs: list[LineRef], tokenizer_path: str, template: str | None,
                 end_of_turn: str | None, max_seq_len: int, length_policy: str, num_anchors: int, seed: int,
                 every_anchor: bool = False):
        super().__init__(max_seq_len, num_anchors, seed, every_anchor)
        self.files, self.refs = files, refs
        self.tokenizer_path, self.template, self.end_of_turn = tokenizer_path, template, end_of_turn
        self.length_policy = length_policy
        self._tokenizer = None  # loaded in the worker that first needs it

    def __len__(self) -> int:
        return len(self.refs)

    def record_id(self, index: int) -> str:
        return self.refs[index].id

    def read(self, index: int) -> dict:
        from dflashkit.dump.tokenize import tokenize_conversation

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        ref = self.refs[index]
        source = f"{self.files[ref.file].name}:{ref.lineno}"
        with open(self.files[ref.file], "rb") as f:
            f.seek(ref.offset)
            rec = generated_record(*parse_line(f.readline(), source), index)
        try:
            if rec.error is not None:
                raise rec.error
            tok = tokenize_conversation(self._tokenizer, record_messages(rec.record), rec.template_kwargs,
                                        self.template, self.max_seq_len, self.length_policy, self.end_of_turn)
        except BadRecord as e:
            raise BadRecordError(f"{source}: {e.reason}: {e.detail}") from e
        return {"input_ids": torch.tensor(tok.input_ids, dtype=torch.long),
                "loss_mask": torch.tensor(tok.loss_mask, dtype=torch.uint8)}


def online_meta(target_model: str, online) -> dict:
    """The dump meta an online run stands in for: the target's shape and the target layer ids."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target_model)
    n_layers = num_hidden_layers(config)
    try:
        ids = online.target_layer_ids or default_target_layer_ids(n_layers, online.num_target_layers)
        ids = check_target_layer_ids(ids, n_layers)
    except ValueError as e:
        raise ConfigError(f"data.online: {e}") from None
    return {"target_layer_ids": ids, "hidden_size": hidden_size(config), "num_hidden_layers": n_layers,
            "final_state": FINAL_STATE}


def length_groups(lengths: list[int], forward_cost: int,
                  shape: Callable[[int, int], tuple[int, int]] | None = None) -> list[list[int]]:
    """Row indices in groups of similar length, each group one target forward: the split of the rows sorted longest
    first that minimizes padded tokens + `forward_cost` per forward (exact, by dynamic programming over the cuts).
    `shape(rows, length)`: the shape such a forward really runs at (CUDA graphs pad it: GraphedForward.shape), whose
    tokens are the ones it computes; default: rows x the longest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0] + [float("inf")] * n  # best[j]: the cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 in one forward, padded to the longest, sorted row i
            rows, length = shape(j - i, lengths[order[i]]) if shape else (j - i, lengths[order[i]])
            cost = best[i] + rows * length + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def padded_shape(rows: int, length: int, length_step: int) -> tuple[int, int]:
    """The shape a forward of `rows` x `length` ids runs at under CUDA graphs: rows up to a power of two, length up to
    a multiple of `length_step`, so a run meets a few shapes (for SmolLM2's recipe at one forward a micro-batch: 32
    rows, 8 lengths; in length groups of a few thousand tokens, about 20 shapes)."""
    return 1 << (rows - 1).bit_length(), -(-length // length_step) * length_step


class GraphedForward:
    """The backend's forward replayed as CUDA graphs (data.online.cuda_graphs). The eager forward launches its
    ~1,500 kernels (SmolLM2) one by one from Python, host time in series with the training step's; a replay queues
    them at once. Each padded shape is captured when first seen, all in one memory pool; the ids are copied into the
    graph's static input (the padding rows and positions keep what they held: attention is causal and per row, so
    they never reach the real ones) and the outputs copied out of its static buffers. Every replay waits for the
    previous one's copies, on whatever stream it ran (the held-out pass has its own prefetch stream), because the
    graphs share their buffers."""

    LENGTH_STEP = 256

    def __init__(self, backend):
        self.backend = backend
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple] = {}  # shape -> (graph, static ids, final, aux)
        self.copied = torch.cuda.Event()  # the last replay's outputs are copied out (never recorded: nothing to wait)

    def capture(self, rows: int, length: int) -> tuple:
        ids = torch.zeros(rows, length, dtype=torch.long, device=self.backend.device)
        warm = torch.cuda.Stream(self.backend.device)  # cuBLAS handles and workspaces exist before the capture
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            self.backend.forward(ids)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: the loader's pin-memory thread may call the CUDA API meanwhile, not ours to capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                final, aux = self.backend.forward(ids)
        except RuntimeError as e:  # e.g. a host read inside the model's forward
            raise RuntimeError(f"data.online.cuda_graphs: this target's forward cannot be captured ({e}); "
                               "set data.online.cuda_graphs=false") from e
        log.info("online target: CUDA graph captured for %d x %d ids", rows, length)
        return graph, ids, final, aux

    @classmethod
    def shape(cls, rows: int, length: int) -> tuple[int, int]:
        """The padded shape a forward of rows x length ids replays at."""
        return padded_shape(rows, length, cls.LENGTH_STEP)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.shape(*ids.shape)
        rows, length = ids.shape
        if shape not in self.graphs:
            self.graphs[shape] = self.capture(*shape)
        graph, static, final, aux = self.graphs[shape]
        stream = torch.cuda.current_stream()
        stream.wait_event(self.copied)
        static[:rows, :length].copy_(ids)
        graph.replay()
        out = final[:rows, :length].clone(), aux[:rows, :length].clone()
        self.copied.record(stream)
        return out


class TargetFeatures:
    """The frozen target on this rank's device: adds `aux_hidden_states` (and, for KD, `hidden_states`) to a
    collated micro-batch, on the device, packed like a dump's states."""

    def __init__(self, model, meta: dict, device: torch.device, dtype: torch.dtype, with_final: bool,
                 forward_cost: int, compile: bool = False, cuda_graphs: bool = False):
        """`forward_cost`: data.online.forward_cost_tokens (length_groups); `compile`: data.online.compile_target;
        `cuda_graphs`: data.online.cuda_graphs (CUDA only: elsewhere the eager forward runs)."""
        from dflashkit.dump.hf_backend import HFBackend

        self.backend = HFBackend(model, dtype, meta["target_layer_ids"], device=str(device))
        self.device, self.with_final, self.forward_cost = device, with_final, forward_cost
        if compile:  # the instance's forward: the backend's final-state hook is traced with it
            self.backend.model.forward = torch.compile(self.backend.model.forward, dynamic=True)
        graphed = cuda_graphs and device.type == "cuda"
        self.forward = GraphedForward(self.backend) if graphed else self.backend.forward
        # Groups are cut by the tokens their forwards compute: under CUDA graphs, the padded shapes'.
        self.forward_shape = GraphedForward.shape if graphed else None

    def __call__(self, batch: dict) -> dict:
        """The batch with the states packed as the loader packs a dump's (`data.PACKED`: [sum of lengths, width],
        the rows' real positions in row order), on the device. The rows run in length groups (`length_groups`), each
        forward cut to its longest row, so the target computes little of the batch's padding."""
        ids = batch["input_ids"]
        # Each row's packed positions (a bad record's placeholder too), from the host-side index: no device sync.
        lengths = torch.bincount(batch["token_index"] // ids.shape[1], minlength=ids.shape[0]).tolist()
        # The loader's pinned ids go over once and each group's rows are picked on the device: rows picked on the
        # host would be a copy from pageable memory, for which the driver may wait until the stream has run what is
        # queued on it (here the training step the side stream waits for) before it stages the copy: nothing queued
        # ahead.
        ids = ids.to(self.device, non_blocking=True)
        groups = length_groups(lengths, self.forward_cost, self.forward_shape)
        # Every group's rows go over in one pinned copy, sliced on the device, as with one group: a pinned tensor per
        # group made the host wait for the GPU on an H200 (tests/gpu/test_online_target_async.py, 2026-12-02; likely
        # new pinned blocks, allocated while the cached ones still wait for their queued copies).
        order = torch.tensor([row for rows in groups for row in rows])
        if self.device.type == "cuda":
            order = order.pin_memory().to(self.device, non_blocking=True)
        finals, auxes = [None] * len(lengths), [None] * len(lengths)
        for rows, index in zip(groups, order.split([len(rows) for rows in groups])):
            longest = max(2, lengths[rows[0]])
            final, aux = self.forward(ids[:, :longest].index_select(0, index))
            for j, row in enumerate(rows):
                finals[row], auxes[row] = final[j, : lengths[row]], aux[j, : lengths[row]]
        out = {**batch, "aux_hidden_states": torch.cat(auxes)}
        if self.with_final:
            out["hidden_states"] = torch.cat(finals)
        return out

    def head(self) -> TargetHead:
        """The draft's frozen head from the target's own tensors (no second copy of the vocabulary matrices)."""
        model = self.backend.model
        lm_head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        norm = model.get_decoder().norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return TargetHead(embed, None if lm_head is embed else lm_head, norm.weight, float(eps))


class Prefetched:
    """The loader's micro-batches with the target's states, `depth` micro-batches ahead: on CUDA each forward is
    queued on a side stream as soon as its batch leaves the loader, and the training stream waits only for the
    batch it takes. On the CPU the forward runs when the batch is taken."""

    def __init__(self, batches: Iterator[dict], target: TargetFeatures, depth: int):
        self.source, self.target, self.depth = batches, target, depth
        cuda = target.device.type == "cuda"
        self.stream = torch.cuda.Stream(target.device) if cuda and depth > 0 else None
        self.queue: deque = deque()

    def __iter__(self) -> Prefetched:
        return self

    def _launch(self) -> bool:
        try:
            batch = next(self.source)
        except StopIteration:
            return False
        if self.stream is None:
            self.queue.append((batch, None))
            return True
        self.stream.wait_stream(torch.cuda.current_stream(self.target.device))
        with torch.cuda.stream(self.stream), record_function(TARGET_FORWARD):
            out = self.target(batch)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.queue.append((out, event))
        return True

    def __next__(self) -> dict:
        while len(self.queue) <= self.depth and self._launch():
            pass
        if not self.queue:
            raise StopIteration
        batch, event = self.queue.popleft()
        if event is None:
            with record_function(TARGET_FORWARD):
                return self.target(batch)
        main = torch.cuda.current_stream(self.target.device)
        main.wait_event(event)
        for key in ("aux_hidden_states", "hidden_states"):
            if key in batch:  # made on the side stream, freed on this one: keep the allocator from reusing it early
                batch[key].record_stream(main)
        return batch


class OnlineSource:
    """data.source=online: records are generated lines; the hidden states come from the target, per micro-batch."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, model=None):
        """`model`: the target as a module instead of loading cfg.target_model (benchmarks)."""
        from transformers import AutoTokenizer

        from dflashkit.templates import mask_source, read_template

        self.cfg, o = cfg, cfg.data.online
        self.meta = {**online_meta(cfg.target_model, o), "dtype": dtype_name(dtype)}
        self.files, self.records = index_generated(o.inputs)
        self.heldout = None  # None: drawn from the records (data.heldout_records)
        if o.heldout_inputs:
            files, refs = index_generated(o.heldout_inputs)
            self.heldout = [dataclasses.replace(r, file=r.file + len(self.files)) for r in refs]
            self.files += files
        try:  # None: the tokenizer's own
            self.template = read_template(o.chat_template) if o.chat_template else None
        except OSError as e:
            raise ConfigError(f"data.online.chat_template: {e}") from None
        if o.tokenizer:
            require_local_model(o.tokenizer, "data.online.tokenizer")
        # What the workers will render with, checked once here: no template at all stops the run before it starts.
        source = mask_source(AutoTokenizer.from_pretrained(o.tokenizer or cfg.target_model), self.template,
                             o.end_of_turn or None)
        self.meta["mask_source"] = source.kind
        self.target = TargetFeatures(model if model is not None else cfg.target_model, self.meta, device, dtype,
                                     with_final=cfg.loss.kd_weight > 0, forward_cost=o.forward_cost_tokens,
                                     compile=o.compile_target, cuda_graphs=o.cuda_graphs)

    @staticmethod
    def sizes(records: list[LineRef]) -> list[int]:
        return [r.size for r in records]

    def describe(self) -> str:
        o = self.cfg.data.online
        return (f"online from {o.inputs} ({len(self.files)} files), target {self.cfg.target_model}, loss mask: "
                f"{self.meta['mask_source']} of {o.chat_template or 'the tokenizer template'}")

    def dataset(self, records: list, num_anchors: int, every_anchor: bool = False) -> OnlineDataset:
        c, o = self.cfg, self.cfg.data.online
        return OnlineDataset(self.files, records, o.tokenizer or c.target_model, self.template, o.end_of_turn or None,
                             c.data.max_seq_len, o.length_policy, num_anchors, c.seed, every_anchor)

    def head(self) -> TargetHead:
        return self.target.head()

    def batches(self, loader) -> Prefetched:
        return Prefetched(iter(loader), self.target, self.cfg.data.online.prefetch)

"""vLLM backend: prefill each conversation once with the `extract_hidden_states` speculative method.

vLLM captures the residual stream at the EAGLE-style aux ids we pass (capture id = DFlash id + 1, see layers.py) plus
id L, the last decoder layer's output before the final norm, into a cache-only KV layer; our connector
(connector.py) writes one safetensors file per request, which we read, check against the prompt and delete. Prefix
caching is off: a cached prefix would not be recomputed, so its hidden states would never reach the cache-only layer.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..model.layers import vllm_capture_id

log = logging.getLogger("dflashkit.dump")

CONNECTOR = ("HiddenStatesConnector", "dflashkit.dump.connector")


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, dtype: str, target_layer_ids: list[int], num_layers: int, max_seq_len: int,
                 scratch_dir: str | os.PathLike, tp: int = 1, block_size: int | None = None,
                 enforce_eager: bool = False, language_model_only: bool = False, trust_remote_code: bool = False,
                 gpu_memory_utilization: float | None = None, max_num_batched_tokens: int | None = None):
        from vllm import LLM

        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix=".hs-", dir=scratch_dir)
        self.capture_ids = [vllm_capture_id(k) for k in target_layer_ids] + [num_layers]
        extra = {}
        if block_size is not None:
            extra["block_size"] = block_size
        if language_model_only:
            extra["language_model_only"] = True
        if gpu_memory_utilization is not None:
            extra["gpu_memory_utilization"] = gpu_memory_utilization
        if max_num_batched_tokens is not None:  # prompts longer than this are prefilled in chunks (tested equal)
            extra["max_num_batched_tokens"] = max_num_batched_tokens
        self.llm = LLM(
            model=model, dtype=dtype, tensor_parallel_size=tp, enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code, enable_prefix_caching=False, max_model_len=max_seq_len + 1,
            speculative_config={
                "method": "extract_hidden_states", "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self.capture_ids}},
            },
            kv_transfer_config={
                "kv_connector": CONNECTOR[0], "kv_connector_module_path": CONNECTOR[1], "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": self.scratch},
            },
            **extra,
        )
        import vllm.envs

        # In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): generate() returns when the request finishes, before
        # the engine's next step has written the file, so we step it ourselves. A separate engine process keeps
        # stepping on its own and the file's lock makes the reader wait.
        self.in_process = not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING

    def _read(self, path: str) -> dict[str, torch.Tensor]:
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )

        if self.in_process:
            deadline = time.monotonic() + 600
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM did not write {path}")
                self.llm.llm_engine.step()
        data = load_hidden_states(path)
        cleanup_hidden_states(path)  # the file and its lock: consumed
        return data

    def hidden_states(self, items: list[tuple[str, list[int]]]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids in items]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        for (cid, ids), out in zip(items, outputs):
            params = out.kv_transfer_params or {}
            if "hidden_states_path" not in params:
                raise RuntimeError(f"{cid}: vLLM returned no hidden_states_path (is the connector configured?)")
            data = self._read(params["hidden_states_path"])
            if data["token_ids"].tolist() != ids:
                raise RuntimeError(f"{cid}: vLLM captured states for different tokens than the prompt")
            states = data["hidden_states"]  # [T, n + 1, H]: targets in id order, then the final state
            yield cid, states[:, -1].contiguous(), states[:, :-1].reshape(states.shape[0], -1)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

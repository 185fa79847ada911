"""vLLM hidden-states KV connector that also runs on CPU.

vLLM's `extract_hidden_states` speculative method stores the captured layers in a cache-only KV layer; the stock
ExampleHiddenStatesConnector then copies them out per finished request with CUDA streams, events and pinned memory,
which the CPU backend has none of. On CUDA we keep the stock asynchronous path. On CPU the copy is an ordinary
tensor index, so we extract and write synchronously. Either way the file appears under its final name only when
complete (tmp + rename here; the stock path's flock guards it on CUDA), and the reader deletes it once consumed.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Done:
    """Stands in for the CUDA event the stock get_finished() polls: a synchronous write is complete at once."""

    @staticmethod
    def query() -> bool:
        return True


class HiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        if self._kv_cache.is_cuda:
            super()._submit_async_write(pending)
            return
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (block_ids[:, None] * self._block_size + offsets[None, :]).flatten()
        num_tokens = pending.token_ids.shape[0]
        tensors = {
            "hidden_states": extract_from_kv_cache(self._kv_cache, slots, num_tokens).clone(),
            "token_ids": pending.token_ids.clone(),
        }
        directory = os.path.dirname(pending.filename)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hs.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, pending.filename)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            lock_fd = self._lock_fds.pop(pending.req_id, None)
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader waiting on the lock file
        self._req_copy_events[pending.req_id] = _Done()

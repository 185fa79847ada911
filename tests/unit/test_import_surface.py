"""The GPU machines have torch, transformers (with its own dependencies), safetensors and pyyaml, and nothing else:
the stages that run there (HF dump, train, export, eval) must import with only those."""
import subprocess
import sys

import pytest

GPU_SIDE = ["dflashkit.model", "dflashkit.train", "dflashkit.train.online", "dflashkit.dump", "dflashkit.dump.hf_backend",
            "dflashkit.dump.check", "dflashkit.dump.tokenize", "dflashkit.export",
            "dflashkit.eval.run", "dflashkit.eval.plots", "dflashkit.generate.inputs", "dflashkit.cli"]
NOT_THERE = {"vllm", "openai", "datasets", "matplotlib", "requests", "sglang", "submitit", "httpx"}


@pytest.mark.parametrize("module", GPU_SIDE)
def test_gpu_side_modules_import_only_gpu_machine_packages(module):
    code = f"import sys, {module}; print(sorted({NOT_THERE!r} & {{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"

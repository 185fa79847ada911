"""The session's test server (tests/conftest.py's `vllm_server`): the name it serves SmolLM2 under and its chat template."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "smollm2"
THINKING_TEMPLATE = REPO / "configs" / "templates" / "smollm2-thinking.jinja"

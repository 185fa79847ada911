"""Generate's defaults live in dflashkit/generate/settings.py; server_generate.py's flags, worker.sh, the recipe's
generate section and the two doc tables must agree with it (any drift fails here)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dflashkit.generate.run import build_parser
from dflashkit.generate.settings import SETTINGS, readme_table
from dflashkit.recipe import ROOT, GenerateSpec

WORKER = (ROOT / "worker.sh").read_text()
HEADER = "\n".join(line for line in WORKER.splitlines()[:16] if line.startswith("#"))
PARSER = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.flag and s.default is not None], ids=lambda s: s.var)
def test_server_generate_flags_default_to_the_table(s):
    value = PARSER[s.flag].default
    if s.flag == "--think-tags":
        value = value[0] if s.var == "THINK_OPEN_TAG" else value[1]
    assert value == s.default


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.flag is None and s.default is not None], ids=lambda s: s.var)
def test_worker_defaults_are_the_table(s):
    assert re.findall(rf"^{s.var}=\$\{{{s.var}:-([^}}]*)\}}$", WORKER, re.M) == [str(s.default)]
    mentioned = re.search(rf"\b{s.var}\b[^(,]*\(([^)]*)\)", HEADER)
    assert mentioned is None or str(s.default) in mentioned.group(1), f"worker.sh's header: {mentioned.group(0)}"


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.flag and s.var not in ("INPUT", "OUTPUT_DIR",
                                                                               "SERVED_MODEL_NAME")],
                         ids=lambda s: s.var)
def test_worker_passes_every_client_setting_on(s):
    passed = f'add {s.flag} "${{{s.var}:-}}"' in WORKER or f'"${{{s.var}:-{s.default}}}"' in WORKER
    assert passed, f"worker.sh does not pass {s.var} to server_generate.py {s.flag}"


def test_recipe_keys_are_the_table():
    fields = {f.name for f in dataclasses.fields(GenerateSpec)} - {"env", "slurm"}
    assert fields == {s.key for s in SETTINGS if s.recipe}


def recipes_table() -> str:
    """docs/RECIPES.md's generate keys: the recipe's own default, and what null means (the worker's default)."""
    spec = GenerateSpec()
    rows = ["| key | default | when null: the worker's default; meaning |", "|---|---|---|"]
    for s in SETTINGS:
        if s.recipe:
            value = getattr(spec, s.key)
            shown = "required for submit" if value == "" else f"`{'null' if value is None else json.dumps(value)}`"
            worker = s.shown or ("none" if s.default is None else f"`{s.default}`")
            rows.append(f"| `generate.{s.key}` | {shown} | {worker + '; ' if value is None else ''}{s.meaning} |")
    return "\n".join(rows)


@pytest.mark.parametrize("doc,table", [("README.md", readme_table), ("docs/RECIPES.md", recipes_table)])
def test_doc_tables_are_generated_from_the_table(doc, table):
    text = (ROOT / doc).read_text()
    block = re.search(r"<!-- [^\n]*dflashkit/generate/settings.py[^\n]*-->\n(.*?)\n<!-- end of \w+ table -->", text, re.S)
    assert block and block.group(1) == table(), f"{doc}: the table should read\n{table()}"


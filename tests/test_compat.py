"""`final/` directories load unchanged in transformers 4.4x (opt-in: needs a second Python).

Set LMFORGE_COMPAT_PYTHON to an interpreter with transformers 4.x installed, e.g.
`python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch transformers==4.46.3`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import ModelCfg
from lmforge.models import preset_config, save_hf
from lmforge.tokenizer import save_tokenizer, train_bpe

OTHER = os.environ.get("LMFORGE_COMPAT_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not OTHER, reason="set LMFORGE_COMPAT_PYTHON to a transformers 4.x python")]

PROBE = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(d).eval()
t = AutoTokenizer.from_pretrained(d)
ids = t("def add(a, b):", return_tensors="pt").input_ids
with torch.no_grad():
    logits = m(ids).logits
print(json.dumps({"version": transformers.__version__, "ids": ids.tolist(),
                  "logits": logits[0, -1].tolist()}))
"""


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True)])
def test_transformers4_loads_final(tmp_path: Path, arch: str, tied: bool) -> None:
    texts = ["def add(a, b):\n    return a + b\n"] * 20
    tok = save_tokenizer(train_bpe(texts, 270, ["<|endoftext|>", "<|pad|>"], 1), tmp_path / "tok",
                         bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
                         extra_special_tokens=[])
    cfg = ModelCfg(preset="tiny", arch=arch, tie_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(cfg, len(tok), 0, 0, 1)).eval()
    save_hf(model, tmp_path / "final", tok)
    out = subprocess.run([OTHER, "-c", PROBE, str(tmp_path / "final")], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.")
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    assert got["ids"] == ids.tolist()
    with torch.no_grad():
        ref = model(ids).logits[0, -1]
    assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-5)

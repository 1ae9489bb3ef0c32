"""`final/` directories load unchanged in transformers 4.4x (opt-in: needs a second Python).

Set LMFORGE_COMPAT_PYTHON to an interpreter with transformers 4.x and peft installed, e.g.
`python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 &&
/tmp/tf4/bin/pip install transformers==4.46.3 peft` (torch first, alone, so that pip keeps the
CPU build rather than pulling a CUDA one).
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
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from tests.test_peft import CONV, merged_logits_tol, sft_adapter_run

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


# An SFT adapter run's final/ as a transformers 4.x + peft user meets it: the chat template of
# final/ and adapter/, the adapter's tokenizer, and the two-line peft load on the recorded base.
PROBE_ADAPTER = """
import json, sys, torch, transformers
# peft 0.21 looks up torch.distributed.tensor, which only transformers 5 imports for it
import torch.distributed.tensor
from transformers import AutoModelForCausalLM, AutoTokenizer
final, conv = sys.argv[1], json.loads(sys.argv[2])
out = {"version": transformers.__version__}
for name, d in (("final", final), ("adapter", final + "/adapter")):
    t = AutoTokenizer.from_pretrained(d)
    out[name] = {"template": t.chat_template, "text": t.apply_chat_template(conv, tokenize=False),
                 "ids": list(t.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])}
from peft import PeftConfig, PeftModel
adapter = final + "/adapter"
base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(adapter).base_model_name_or_path)
model = PeftModel.from_pretrained(base, adapter).eval().double()
merged = AutoModelForCausalLM.from_pretrained(final).eval().double()
ids = torch.tensor([out["adapter"]["ids"]])
with torch.no_grad():
    out["peft"] = model(input_ids=ids).logits[0].tolist()
    out["merged"] = merged(input_ids=ids).logits[0].tolist()
print(json.dumps(out))
"""


def test_transformers4_finds_template_and_loads_adapter(tmp_path: Path) -> None:
    final, _ = sft_adapter_run(tmp_path)
    out = subprocess.run([OTHER, "-c", PROBE_ADAPTER, str(final), json.dumps(CONV)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.")
    tok = load_tokenizer(final)
    text = tok.apply_chat_template(CONV, tokenize=False)
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    for name in ("final", "adapter"):  # the template found, and the same tokens out of it
        assert got[name]["template"] == tok.chat_template, name
        assert (got[name]["text"], got[name]["ids"]) == (text, list(ids)), name
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(final).eval().double()(
            input_ids=torch.tensor([ids])).logits[0]
    tol = merged_logits_tol(want)
    assert (torch.tensor(got["merged"], dtype=torch.float64) - want).abs().max() <= tol
    assert (torch.tensor(got["peft"], dtype=torch.float64) - want).abs().max() <= tol

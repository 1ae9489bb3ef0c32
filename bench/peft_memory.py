"""Peak memory, step time and trainable parameters of full fine-tuning, LoRA, DoRA and QLoRA
(nf4, double quantization) on the `small` preset, each with and without gradient checkpointing.

    python bench/peft_memory.py [--steps 4] [--batch 4] [--seq 256] [--vocab 8192]

Each configuration runs in its own process, because a process's peak resident memory
(ru_maxrss) cannot be reset: "peak" is that process's high-water mark (the Python, torch and
transformers runtime is ~0.5 GB of it), "train" is how far training raised it above the loaded,
wrapped model, "weights" the bytes the model's parameters occupy (4-bit packed as stored). On a GPU the same script reports
torch.cuda.max_memory_allocated instead. Step = forward + backward + AdamW on one batch,
median of the steps after the first (the first pays for allocation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["full", "lora", "dora", "qlora"]


def one(method: str, ckpt: bool, a: argparse.Namespace) -> dict:
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.config import LoraCfg, ModelCfg  # noqa: F811
    from lmforge.models import (
        apply_lora,
        count_params,
        enable_checkpointing,
        load_quantized,
        preset_config,
    )

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    conf = preset_config(ModelCfg(preset="small"), a.vocab, None, 0, None)
    lora = LoraCfg(method=method, r=16, alpha=32, compute_dtype="bf16")
    if method == "qlora":  # from a dir saved by the parent: no fp32 copy in this process
        model = load_quantized(a.base_dir, lora)
    else:
        model = AutoModelForCausalLM.from_config(conf)
    if ckpt and method != "qlora":  # qlora's is switched on by peft's k-bit preparation
        enable_checkpointing(model)
    if method != "full":
        model = apply_lora(model, lora, [], gradient_checkpointing=ckpt)
        if ckpt:
            model.base_model.model.config.use_cache = False
    model.to(dev).train()
    trainable, total = count_params(model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        extra = peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = peak - rss0
    return {"method": method, "ckpt": ckpt, "trainable": trainable, "total": total,
            "weights_mb": weights_mb,
            "peak_mb": peak, "train_mb": extra, "step_s": statistics.median(times[1:] or times)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "CKPT"))
    p.add_argument("--base-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1] == "1", a)))
        return
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.config import ModelCfg
    from lmforge.models import preset_config

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    conf = preset_config(ModelCfg(preset="small"), a.vocab, None, 0, None)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp.name)
    rows = []
    for m in METHODS:
        for ck in (False, True):
            cmd = [sys.executable, __file__, "--one", m, str(int(ck)), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--vocab", str(a.vocab),
                   "--base-dir", tmp.name]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
            rows.append(json.loads(line) if line else {"method": m, "ckpt": ck,
                                                        "error": r.stderr.strip().splitlines()[-1:]})
    print(f"small preset, vocab {a.vocab}, batch {a.batch} x seq {a.seq}, bf16 autocast, "
          f"LoRA r=16 all-linear; peak = process high-water mark\n")
    print("| method | grad ckpt | trainable params | % of total | weights MB | peak MB | train MB | step s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {'yes' if r['ckpt'] else 'no'} | error: {r['error']} ||||||")
            continue
        print(f"| {r['method']} | {'yes' if r['ckpt'] else 'no'} | {r['trainable']:,} | "
              f"{r['trainable'] / r['total']:.2%} | {r['weights_mb']:,.0f} | {r['peak_mb']:,.0f} | "
              f"{r['train_mb']:,.0f} | "
              f"{r['step_s']:.2f} |")


if __name__ == "__main__":
    main()

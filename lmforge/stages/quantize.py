"""lmforge quantize: a checkpoint quantized, exported, reloaded and checked; and the table.

    lmforge quantize runs/demo/grpo/final --method bnb-nf4 --out runs/q
    lmforge bench quantize runs/demo/grpo/final --methods fp32,fp16,bnb-int8,bnb-nf4

With `method` set, the model loads quantized (compress/quantize.py), is written to
run.dir/final with its tokenizer and a quantization.json saying how, is loaded back from
there as anyone would (`from_pretrained(final)`), and must give the same greedy answers as
before the export: a difference fails the stage. With `bench` set, the comparison table
(compress/qbench.py): one fresh process per method, fp32 as the reference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lmforge.compress import quantize as Q
from lmforge.compress.config import QuantBenchCfg, QuantizeCfg
from lmforge.errors import TrainingError, UserError
from lmforge.models import foreign_entries, listing, resolve_model_dir, written_kind


def check_target(final: Path, source: str) -> None:
    """run.dir/final may be replaced only when it is new, empty, or an earlier quantize
    export nobody changed since; never when it holds the checkpoint being read."""
    target = Path(os.path.abspath(final))
    src = Path(source)
    if src.exists() and (src.resolve() == target.resolve() or target.resolve() in src.resolve().parents):
        raise UserError(f"run.dir: {final} holds the checkpoint being quantized ({source}); "
                        "choose another run.dir")
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_dir():
        raise UserError(f"run.dir: {final} is a file or link, not an export lmforge wrote; "
                        "choose another run.dir")
    foreign = foreign_entries(target)
    if foreign:
        raise UserError(f"run.dir: {final} holds files lmforge did not write ({listing(foreign)}); "
                        "move them or choose another run.dir")
    kind = written_kind(target)
    if kind not in (None, "quantize"):
        raise UserError(f"run.dir: {final} holds a model lmforge wrote ({kind}), not an earlier "
                        "quantize export; choose another run.dir")


def reload(final: Path, device: str, trust_remote_code: bool) -> Any:
    """The export loaded the way a user loads it: its own config says how it is quantized."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"device_map": device} if device == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype="auto",
                                                 trust_remote_code=trust_remote_code, **kw)
    model.eval()
    return model


def export(cfg: QuantizeCfg, source: str, conf: Any, device: str) -> dict[str, Any]:
    """Quantize, write run.dir/final, reload it, compare greedy answers before and after."""
    from lmforge.compress.qbench import agreement, agreement_prompts, greedy_tokens
    from lmforge.eval.harness import Generator
    from lmforge.models import save_hf
    from lmforge.tokenizer import load_tokenizer

    method, final = str(cfg.method), cfg.run.dir / "final"
    t0 = time.perf_counter()
    model = Q.load_quantized_as(source, method, cfg, device)
    load_s = time.perf_counter() - t0
    wbytes = Q.weight_bytes(model)  # before a forward repacks anything
    tokenizer = load_tokenizer(source)
    record = Q.export_record(method, cfg, device, source, conf)
    # written before the model's first forward: bitsandbytes' CPU kernels repack 4-bit
    # weights in place on first use, and a save after that stores the repacked constants
    save_hf(model, final, tokenizer, kind="quantize", extra={Q.RECORD: Q.record_json(record)})
    gen = Generator(model, tokenizer)
    bench = cfg.bench or QuantBenchCfg()
    prompts = agreement_prompts(gen, bench, cfg.seed)
    before = greedy_tokens(model, prompts, gen.stop_ids, gen.pad, bench.agree_tokens)
    del model, gen  # one copy in memory at a time
    back = reload(final, device, cfg.model.trust_remote_code)
    reloaded_bytes = Q.weight_bytes(back)
    gen = Generator(back, tokenizer)  # the stop ids as the export's own files give them
    after = greedy_tokens(back, prompts, gen.stop_ids, gen.pad, bench.agree_tokens)
    exact, prefix = agreement(before, after)
    if exact < 1.0:
        differ = sum(a != b for a, b in zip(before, after))
        raise TrainingError(f"{final}: reloaded, the export answers {differ} of {len(prompts)} "
                            f"prompts differently from the model it was written from (mean common "
                            f"prefix {prefix:.1f} tokens); the export is not faithful")
    if reloaded_bytes != wbytes:  # same answers from a different storage: worth a look
        print(f"quantize: note: reloaded, the weights take {reloaded_bytes} bytes, "
              f"{wbytes} before export")
    print(f"quantize: {method} -> {final}: {wbytes / 2**20:.2f} MiB of weights; reloaded, the "
          f"same greedy answers on {len(prompts)} prompts")
    return {"method": method, "dir": str(final), "load_s": round(load_s, 3),
            "weight_bytes": wbytes, "reloaded_weight_bytes": reloaded_bytes,
            "same_greedy_after_reload": True, "prompts": len(prompts),
            "note": Q.note(method, device, conf), "record": record}


def main(cfg: QuantizeCfg) -> dict[str, Any]:
    if not cfg.model.path:
        raise UserError("model.path: give the checkpoint to quantize")
    if cfg.method is None and cfg.bench is None:
        raise UserError("method is null and there is no bench: nothing to do; set method "
                        "(an export) or bench (the table)")
    device = Q.resolve_device(cfg.device)
    source = resolve_model_dir(cfg.model.path)
    conf = Q.source_config(source, cfg.model.trust_remote_code)
    summary: dict[str, Any] = {"model": source, "device": device}
    if cfg.method is not None:
        why = Q.unsupported(cfg.method, device, conf)
        if why is not None:
            raise UserError(f"method={cfg.method} cannot run on {device}: {why}")
        check_target(cfg.run.dir / "final", source)  # before the slow part, not after
        summary["export"] = export(cfg, source, conf, device)
    if cfg.bench is not None:
        from lmforge.compress.qbench import run_table

        summary["bench"] = run_table(cfg, source, cfg.run.dir, device)
    return summary

"""Knowledge distillation: a frozen teacher's softened next-token distributions train a
student on the one loop (Hinton et al. 2015), off-policy on chat data or on-policy on the
student's own samples (GKD, Agarwal et al. 2024).

    lmforge distill configs/distill/demo.yaml loss.temperature=4 on_policy.fraction=0.5

Reads top to bottom: the teacher and the one tokenizer both models must share (checked), the
student (a saved model, a preset from scratch, or the teacher's own layers), the chat data as
the sft stage loads, renders and packs it, the step (both models' last hidden states, the loss
in vocabulary-sized chunks: losses/distill.py), on-policy batches, the loop, then held-out
pass@1 of the teacher, the student before and the student shipped.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import ChatFormat, Rendered, stop_token_ids
from lmforge.compress.config import DistillCfg
from lmforge.compress.prune import keep_zeros, masked_record
from lmforge.data.sft import SftBatches, collate, lm_logits, pack_rows
from lmforge.errors import UserError
from lmforge.losses.distill import Head, distill_loss
from lmforge.models import (
    adapter_export,
    config_summary,
    enable_checkpointing,
    final_hidden,
    load_model,
    plain_head,
    resolve_model_dir,
)
from lmforge.rl.rollout import HfEngine, SamplingCfg
from lmforge.stages.sft import (
    SYNTHETIC,
    build_batches,
    load_data,
    load_sft_model,
    load_tokenizer_and_format,
    pass_at_1,
    task_splits,
)
from lmforge.tokenizer import load_tokenizer
from lmforge.train.loop import Task, train
from lmforge.train.precision import Precision, make_precision

Batch = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- tokenizers


def load_tokenizers(cfg: DistillCfg, teacher_dir: str) -> tuple[PreTrainedTokenizerBase, ChatFormat, DistillCfg]:
    """The student's tokenizer with the chat template installed, as sft loads it, checked to
    be the teacher's; and the config the sft helpers read (its data.tokenizer names the
    teacher's when the student brings none: a preset or the teacher's layers)."""
    own = cfg.model.path or cfg.data.tokenizer
    sft_cfg = cfg if own is not None else cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"tokenizer": Path(teacher_dir)})})
    tokenizer, fmt, _ = load_tokenizer_and_format(sft_cfg)  # type: ignore[arg-type]
    teacher_tok = load_tokenizer(teacher_dir, cfg.teacher.trust_remote_code)
    check_same_tokenizer(tokenizer, teacher_tok, str(own or teacher_dir), cfg.teacher.path or "")
    if (teacher_tok.chat_template or "") not in ("", fmt.template):
        print(f"distill: note: the teacher was saved with another chat template than "
              f"data.template={cfg.data.template} renders; it reads the student's format")
    return tokenizer, fmt, sft_cfg


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                         student_src: str, teacher_src: str) -> None:
    """The soft loss compares the two distributions id by id, so both models must mean the
    same token by every id: the same vocabulary (ids, not just its size) and special tokens.
    One line naming both and the first difference."""
    where = f"teacher.path={teacher_src} and the student's tokenizer ({student_src})"
    why = "distillation compares the two models' distributions id by id, so they must share one tokenizer"
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        s_of, t_of = {i: t for t, i in sv.items()}, {i: t for t, i in tv.items()}
        i = min(i for i in s_of.keys() | t_of.keys() if s_of.get(i) != t_of.get(i))
        raise UserError(f"{where} differ at id {i}: {s_of.get(i)!r} in the student's, "
                        f"{t_of.get(i)!r} in the teacher's ({len(sv)} vs {len(tv)} tokens); {why}")
    for name in ("bos_token", "eos_token", "unk_token"):
        s, t = getattr(student, name, None), getattr(teacher, name, None)
        if s != t:
            raise UserError(f"{where} differ in {name}: {s!r} in the student's, {t!r} in the teacher's; {why}")
    diff = sorted({a.content for a in student.added_tokens_decoder.values() if a.special}
                  ^ {a.content for a in teacher.added_tokens_decoder.values() if a.special})
    if diff:
        raise UserError(f"{where} differ in which tokens are special ({diff[0]!r} first); {why}")


# --------------------------------------------------------------------------- the two models


def load_teacher(cfg: DistillCfg, device: torch.device) -> tuple[PreTrainedModel, str]:
    if cfg.teacher.path is None:
        raise UserError("distill: set teacher.path (an HF dir, stage dir or hub id)")
    d = resolve_model_dir(cfg.teacher.path)
    teacher = load_model(d, cfg.teacher.trust_remote_code).to(device)
    return teacher.eval().requires_grad_(False), d  # frozen: no grads, dropout off


_LAYER = re.compile(r"\.(layers|h)\.(\d+)\.")  # llama-style `layers.N.`, GPT-2's `h.N.`


def student_from_layers(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """The teacher with only the decoder layers `keep` (in that order), its embeddings, final
    norm and output layer copied: a shallower model that starts from what the teacher knows."""
    n = teacher.config.num_hidden_layers
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise UserError(f"student_layers={keep}: give distinct layer indices of the teacher's "
                        f"{n} (0 to {n - 1})")
    conf = teacher.config.__class__.from_dict(teacher.config.to_dict())
    conf.num_hidden_layers = len(keep)
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = [conf.layer_types[i] for i in keep]
    with torch.random.fork_rng(devices=[]):  # every weight is overwritten below
        student = AutoModelForCausalLM.from_config(conf)
    state = {}
    for k, v in teacher.state_dict().items():
        m = _LAYER.search(k)
        if m is None:
            state[k] = v
        elif int(m.group(2)) in keep:
            state[f"{k[:m.start()]}.{m.group(1)}.{keep.index(int(m.group(2)))}.{k[m.end():]}"] = v
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def load_student(cfg: DistillCfg, tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat,
                 teacher: PreTrainedModel) -> tuple[PreTrainedModel, str]:
    """The student and a line saying where it came from."""
    m = cfg.model
    if cfg.student_layers is None:
        if m.path is None and m.preset is None:
            raise UserError("distill: set the student: model.path, model.preset or student_layers")
        model = load_sft_model(cfg, tokenizer, fmt)  # type: ignore[arg-type]
        return model, f"{m.path}" if m.path else f"preset {m.preset} from scratch"
    if m.path is not None:
        raise UserError(f"student_layers builds the student from the teacher: set it or "
                        f"model.path={m.path}, not both")
    if cfg.lora.method != "full":
        raise UserError(f"lora.method={cfg.lora.method} adapts a saved model: set model.path, or "
                        "train the student_layers student in full")
    model = student_from_layers(teacher, cfg.student_layers).train()
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, fmt)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    return model, f"the teacher's layers {cfg.student_layers}"


def features(model: nn.Module, b: Batch, vocab: int) -> tuple[torch.Tensor, Head]:
    """(last hidden states (B, T, D), the output layer) so the loss makes logits per chunk;
    for a model whose logits are more than its output layer (scaled, capped), the logits
    themselves and the identity. Both heads are cut to the shared `vocab`."""
    head = plain_head(model)
    if head is None:
        return lm_logits(model, b), lambda x: x[..., :vocab]
    hidden = final_hidden(model, b["input_ids"], b["position_ids"])
    return hidden, lambda x: head(x)[..., :vocab]


def shared_vocab(student: PreTrainedModel, teacher: PreTrainedModel, n_tokens: int) -> int:
    """The logits both models have: rows past the tokenizer's ids (padding a vocabulary to a
    round size) are cut; a model lacking rows for some of its ids is an error."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if min(vs, vt) < n_tokens:
        raise UserError(f"teacher.path: the teacher has {vt} output rows and the student {vs}, "
                        f"but the shared tokenizer has {n_tokens} ids")
    return min(vs, vt)


# --------------------------------------------------------------------------- on-policy


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` trains on the student's samples: a function of
    (seed, step) alone, so a resumed run makes the same choices."""
    return fraction > 0 and random.Random(f"{seed}/{step}/on_policy").random() < fraction


def answer_prompts(b: Batch) -> list[list[int]]:
    """The prompt of every example packed in a collated batch: its tokens before its last
    answer. Examples start where position ids restart at 0; `loss_mask[t]` marks target t,
    the example's token t + 1, so an answer whose first target is t starts after token t."""
    out = []
    for r in range(b["input_ids"].size(0)):
        n = int(b["valid"][r].sum())
        ids, pos = b["input_ids"][r, :n].tolist(), b["position_ids"][r, :n].tolist()
        mask = b["loss_mask"][r, :n].tolist()
        starts = [k for k in range(n) if pos[k] == 0] + [n]
        for s, e in zip(starts, starts[1:]):
            t = e - s - 1
            while t >= 0 and mask[s + t] == 0:
                t -= 1
            while t > 0 and mask[s + t - 1] == 1:
                t -= 1
            if t >= 0:
                out.append(ids[s:s + t + 1])
    return out


def sampled_batch(engine: HfEngine, b: Batch, sampling: SamplingCfg, seed: int, step: int,
                  i: int, capacity: int, pad_id: int) -> Batch:
    """Micro-batch `i` of step `step` with each answer replaced by the student's own sample
    (drawn with a generator seeded by (seed, step, i)), packed as sft packs, loss on the
    sampled tokens."""
    prompts = answer_prompts(b)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]))
    ro = engine.generate(prompts, sampling, g)
    seqs = [Rendered(p + ro.completion(j), [0] * len(p) + [1] * int(ro.mask[j].sum()))
            for j, p in enumerate(prompts)]
    lengths = [len(s.ids) for s in seqs]
    out = collate(seqs, pack_rows(lengths, max(capacity, max(lengths)), seed + step), pad_id)
    out["on_policy"] = torch.tensor(1.0)
    out["sample_len"] = ro.lengths.double().mean()
    return out


# --------------------------------------------------------------------------- the task


def distill_task(cfg: DistillCfg, student: PreTrainedModel, teacher: PreTrainedModel,
                 train_b: SftBatches, val_b: SftBatches, vocab: int, engine: HfEngine | None,
                 device: torch.device) -> Task:
    t, L, op = cfg.train, cfg.loss, cfg.on_policy
    sampling = SamplingCfg(max_new_tokens=op.max_new_tokens, temperature=op.temperature)

    def loss_of(b: Batch, alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        hidden, head = features(student, b, vocab)
        with torch.no_grad():
            t_hidden, t_head = features(teacher, b, vocab)
        return distill_loss(hidden, head, t_hidden, t_head, b["targets"], b["loss_mask"],
                            kind=L.kind, temperature=L.temperature, alpha=alpha,
                            beta=L.jsd_beta, chunk_rows=L.chunk_rows)

    def step(b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        on = "on_policy" in b
        # on the student's samples the "hard labels" are its own tokens: soft loss only
        loss, m = loss_of(b, 1.0 if on else L.alpha)
        del m["n_tokens"]
        # every step logs the same keys (the loop averages them over each logging interval)
        return loss, {**m, "on_policy": float(on), "sample_len": float(b.get("sample_len", 0.0))}

    def batches(n: int) -> list[Batch]:
        micro = train_b.micro_batches(n, t.micro_batch_size, t.grad_accum)
        if engine is None or not is_on_policy(t.seed, n, op.fraction):
            return micro
        return [sampled_batch(engine, b, sampling, t.seed, n, i, cfg.data.max_length,
                              train_b.pad_id) for i, b in enumerate(micro)]

    val_batches = val_b.eval_batches(t.micro_batch_size)

    def evaluate() -> dict[str, float]:
        """Held-out hard cross-entropy (val_loss: comparable whatever alpha and T), and how
        far the student is from the teacher there."""
        sums: dict[str, float] = {}
        n = 0.0
        for b in val_batches:
            loss, m = loss_of(b, 0.0)
            w = m.pop("n_tokens")
            for k, v in {"loss": float(loss), **m}.items():
                sums[k] = sums.get(k, 0.0) + v * w
            n += w
        return {f"val_{k}": v / max(n, 1.0) for k, v in sums.items() if k != "hard"}

    return Task(step=step, batches=batches, weight=lambda b: float(b["loss_mask"].sum()),
                tokens=lambda b: int(b["valid"].sum()), evaluate=evaluate)


# --------------------------------------------------------------------------- main


def check_on_policy(cfg: DistillCfg, student: PreTrainedModel) -> None:
    """On-policy batches replace each example's last answer with a sample: there must be an
    answer to replace, and room for the sample in the student's context."""
    if not cfg.on_policy.fraction:
        return
    if cfg.data.train_on_prompt:
        raise UserError("on_policy.fraction replaces the answers with the student's samples, "
                        "but data.train_on_prompt=true trains on whole conversations; set it false")
    c = student.config
    ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1 << 30
    if cfg.data.max_length + cfg.on_policy.max_new_tokens > ctx:
        raise UserError(f"on_policy.max_new_tokens={cfg.on_policy.max_new_tokens} after a prompt "
                        f"of up to data.max_length={cfg.data.max_length} tokens passes the "
                        f"student's {ctx}-token context; lower one of them")


def task_pass_at_1(cfg: DistillCfg, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   fmt: ChatFormat, splits: Any, precision: Precision, when: str,
                   limit: int | None) -> dict[str, Any]:
    if splits is None or cfg.eval.task != SYNTHETIC:
        return {}
    return {"pass_at_1": pass_at_1(model, tokenizer, fmt, splits, cfg, precision, when, limit)}  # type: ignore[arg-type]


def measure_start(cfg: DistillCfg, student: PreTrainedModel, teacher: PreTrainedModel, task: Task,
                  tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat, splits: Any,
                  precision: Precision) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher's pass@1 (once per run) and the student's held-out losses and pass@1
    before training: what the summary sets the trained student against."""
    teacher_row: dict[str, Any] = {"path": cfg.teacher.path}
    assert task.evaluate is not None
    with torch.no_grad(), precision.autocast():
        student.eval()
        before: dict[str, Any] = {"val": {k: round(v, 6) for k, v in task.evaluate().items()}}
        student.train()
    if cfg.eval.teacher:  # the teacher's is done once, here
        teacher_row.update(task_pass_at_1(cfg, teacher, tokenizer, fmt, splits, precision,
                                          "teacher", cfg.eval.after_n))
    if cfg.eval.before:
        before.update(task_pass_at_1(cfg, student, tokenizer, fmt, splits, precision, "before",
                                     cfg.eval.before_n))
    return teacher_row, before


def main(cfg: DistillCfg) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.data.train is None:
        raise UserError(f"distill: set data.train (a chat .jsonl/.json file, a hub dataset id, "
                        f"{SYNTHETIC} or mbpp[:SOURCE])")
    pruned_rec = masked_record(cfg.model.path, cfg.lora.method)
    teacher, teacher_dir = load_teacher(cfg, device)
    tokenizer, fmt, sft_cfg = load_tokenizers(cfg, teacher_dir)
    splits = task_splits(cfg)  # type: ignore[arg-type]
    train_c, val_c, data_stats = load_data(sft_cfg, splits)  # type: ignore[arg-type]
    if not val_c:
        raise UserError("distill: the validation split is empty; raise data.val_fraction or set data.val")
    train_b, data_stats["train"] = build_batches(train_c, tokenizer, sft_cfg, "training")  # type: ignore[arg-type]
    val_b, data_stats["val"] = build_batches(val_c, tokenizer, sft_cfg, "validation")  # type: ignore[arg-type]
    student, origin = load_student(sft_cfg, tokenizer, fmt, teacher)
    student.to(device)
    check_on_policy(cfg, student)
    vocab = shared_vocab(student, teacher, len(tokenizer))
    info, t_info = config_summary(student), config_summary(teacher)
    precision = make_precision(cfg.train.precision, device.type)
    L, op = cfg.loss, cfg.on_policy
    print(f"{cfg.run.dir.name}: teacher {t_info['params']:,} params -> student ({origin}) "
          f"{info['params']:,} params, trainable {info['trainable_params']:,} ({cfg.lora.method}); "
          f"{L.kind} at T={L.temperature:g}, alpha {L.alpha:g}"
          f"{f', on-policy share {op.fraction:g}' if op.fraction else ''}; "
          f"{len(train_b.rows):,} rows of {data_stats['train']['examples']:,} examples")

    engine = None
    if op.fraction:
        engine = HfEngine(student, tokenizer, stop_token_ids(tokenizer, fmt), tokenizer.pad_token_id,
                          precision.autocast)
    task = distill_task(cfg, student, teacher, train_b, val_b, vocab, engine, device)
    teacher_row, before = measure_start(cfg, student, teacher, task, tokenizer, fmt, splits, precision)
    task.export = adapter_export(cfg.lora.method, cfg.model.path, tokenizer)
    # a student pruned with an unstructured method keeps its zeros (prune, then distill)
    keeper = keep_zeros(task, student, pruned_rec, "distill", cfg.train.parallel)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, student, task, tokenizer)
    pruned = keeper.finish(res.final_dir, "distill", res.steps) if keeper is not None else None

    final = load_model(res.final_dir).to(device)  # "after" is measured on what was shipped
    after = task_pass_at_1(cfg, final, load_tokenizer(res.final_dir), fmt, splits, precision,
                           "after", cfg.eval.after_n)
    keys = ("soft", "hard", "agree", "teacher_ce")
    return {
        **info,
        "student": origin,
        "method": cfg.lora.method,
        "teacher": {**teacher_row, "params": t_info["params"],
                    "val_loss": before["val"].get("val_teacher_ce")},
        "loss": {"kind": L.kind, "temperature": L.temperature, "alpha": L.alpha,
                 **({"jsd_beta": L.jsd_beta} if L.kind == "jsd" else {})},
        "on_policy": {"fraction": op.fraction, "steps": sum(
            is_on_policy(cfg.train.seed, s, op.fraction) for s in range(res.steps))},
        "template": fmt.name,
        "data": data_stats,
        **res.facts(),
        "final_train": {k: res.last[k] for k in keys if k in res.last},
        "final_val_loss": res.best_val_loss,
        "before": before,
        "after": after,
        "nonfinite_skipped": res.nonfinite_skipped,
        **({"pruned": pruned} if pruned is not None else {}),
        "final_dir": str(res.final_dir),
    }

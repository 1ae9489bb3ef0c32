"""KTO (Ethayarajh et al. 2024): preference from unpaired thumbs-up / thumbs-down rows.

Each row is a (prompt, completion) judged desirable or not; no pairing is needed, so data that
only says "good" or "bad" trains as is (pairs give one row of each label). The loss compares
each completion's reward beta * log pi/pi_ref with a baseline z0, the policy's KL to the
reference estimated on the same batch from mismatched (prompt, completion) rows; those KL
sequences ride in the same packed forward pass as the real ones. Model loading, data, the
reference and the held-out evaluation are DPO's (stages/dpo.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from lmforge.config import KtoCfg
from lmforge.data.preference import UnpairedBatches
from lmforge.losses.preference import kto_loss
from lmforge.stages.dpo import preference_task, run_preference
from lmforge.train.loop import Task
from lmforge.train.reference import Reference, batch_logps


def kto_task(model: PreTrainedModel, train_b: UnpairedBatches, val_b: UnpairedBatches,
             ref: Reference, cfg: KtoCfg, device: torch.device) -> Task:
    def loss_of(b: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        P = b["index"].numel()
        logps, ntok = batch_logps(model, b)  # (2P,): completions, then their KL sequences
        r = ref.logps(b, split)
        loss, m = kto_loss(logps[:P], r[:P], b["desirable"], logps[P:].detach(), r[P:],
                           beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight)
        m["len/completion"] = float(ntok[:P].mean())
        m["logps/completion"] = float(logps[:P].detach().mean())
        return loss, m

    return preference_task(loss_of, train_b, val_b, cfg)


def main(cfg: KtoCfg) -> dict[str, Any]:
    summary = run_preference(cfg, True, kto_task)
    return {"beta": cfg.beta, "desirable_weight": cfg.desirable_weight,
            "undesirable_weight": cfg.undesirable_weight, **summary}

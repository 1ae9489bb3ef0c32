"""Pruning: which weights, heads or MLP neurons to remove, removing them, and keeping them removed.

Unstructured (magnitude, Wanda) and 2:4 set entries of the blocks' matrices to zero: the saved
file and every matmul keep their dense shapes, so without sparse kernels nothing gets faster
(bench/prune.py measures it). Structured pruning deletes whole attention heads (with GQA: whole
key/value groups with their query heads) and MLP neurons, the same number in every block, and
writes a config that describes the smaller matrices: the result is an ordinary, smaller model.

Only the transformer blocks' linear layers are pruned. The embedding is a lookup, where a zero
saves no compute, and in tied models it is also the output layer, whose every row is one token's
logit; both the Wanda and SparseGPT papers leave the embeddings and the head dense.

Masks are boolean tensors, True where a weight is KEPT.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lmforge.errors import UserError
from lmforge.models import body_of, record_written, resolve_model_dir
from lmforge.train import distributed

RECORD = "prune.json"  # written next to the weights; recovery stages read it
UNSTRUCTURED = ("magnitude", "wanda", "2:4")  # methods whose zeros a fine-tune must keep

Side = Literal["out", "in"]

# --------------------------------------------------------------------------- the matrices


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every Linear / GPT-2 Conv1D inside the transformer body (so not the LM head)."""
    inside = {id(m) for m in body_of(model).modules()}
    return {n: m for n, m in model.named_modules()
            if id(m) in inside and isinstance(m, (nn.Linear, Conv1D))}


def out_in(m: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view: Conv1D stores it transposed."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.t()


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of `scores` with exactly its `k` smallest entries dropped (ties: the earlier
    position goes first, so the count is exact even when many scores are equal).

    scores [[3, 1], [2, 5]], k=2 -> [[True, False], [False, True]]."""
    flat = scores.flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view(scores.shape)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: Literal["global", "layer"]) -> dict[str, torch.Tensor]:
    """Drop the smallest |w|: `sparsity` of each matrix (layer), or of all of them together
    with one threshold (global), so matrices with smaller weights lose more.

    W1 = [[1, -4], [3, 0.5]], W2 = [[10, 20], [-30, 40]], sparsity 0.5:
      layer:  W1 loses 0.5 and 1 -> [[F, T], [T, F]];  W2 loses 10, 20 -> [[F, F], [T, T]]
      global: the 4 smallest of all 8 are 0.5, 1, 3, 4 -> W1 all False, W2 all True."""
    if scope == "layer":
        return {n: lowest_k_mask(w.abs(), round(sparsity * w.numel())) for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = lowest_k_mask(flat, round(sparsity * flat.numel())).split(
        [w.numel() for w in weights.values()])
    return {n: k.view(w.shape) for (n, w), k in zip(weights.items(), keep)}


def wanda_scores(weight: torch.Tensor, in_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): S_ij = |W_ij| * ||X_j||_2, X_j input feature j over all
    calibration tokens. `weight` is (out, in), `in_sq_norms` the (in,) squared norms.

    W = [[1, -2], [3, 0.5]], ||X||^2 = [16, 1] -> S = [[4, 2], [12, 0.5]]: at 50% per row both
    rows drop column 1, where magnitude alone would drop W_00 = 1 (|1| < |-2|)."""
    return weight.abs() * in_sq_norms.to(weight.dtype).sqrt()


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop `round(sparsity * in)` lowest scores in every output row: Wanda compares weights
    feeding the same output, whose errors add up in that output.

    [[4, 2, 9, 1], [1, 7, 3, 8]], 0.5 -> [[T, F, T, F], [F, T, F, T]]."""
    k = round(sparsity * scores.size(1))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], False)
    return keep


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M semi-structured: keep the `n` largest of every `m` consecutive input weights of a
    row (2:4: exactly 2 zeros in every 4, the pattern sparse tensor cores run at 2x).

    row [1, -3, 2, 0.5, 4, 4, -1, 0] by |w|, 2:4 -> [F, T, T, F, T, T, F, F]."""
    out, inp = scores.shape
    if inp % m:
        raise ValueError(f"{inp} input features are not a multiple of {m}")
    groups = scores.reshape(out, inp // m, m)
    top = torch.argsort(-groups, dim=-1, stable=True)[..., :n]  # stable: ties keep the first
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out, inp)


@torch.no_grad()
def apply_mask(m: nn.Module, keep: torch.Tensor) -> None:
    out_in(m).mul_(keep)


def zero_share(modules: dict[str, nn.Module]) -> tuple[dict[str, float], float]:
    """(share of zeros per matrix, share over all of them)."""
    per = {n: float((m.weight == 0).float().mean()) for n, m in modules.items()}
    total = sum(m.weight.numel() for m in modules.values())
    zeros = sum(per[n] * m.weight.numel() for n, m in modules.items())
    return per, zeros / max(total, 1)


# --------------------------------------------------------------------------- calibration


class _Stop(Exception):
    """Raised by a hook once the blocks being measured have run: the rest of the forward
    pass would compute nothing the measurement needs."""


@torch.no_grad()
def input_sq_norms(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                   stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """||X_j||_2^2 per input feature j of each module, summed over every calibration token
    (float64: a sum of squares over many tokens). `stop_after`: a block after which the
    forward pass ends early, as nothing later is measured.

    Inputs x1 = [1, 2], x2 = [3, 0] to a Linear -> [1 + 9, 4 + 0] = [10, 4]."""
    sums = {n: torch.zeros(out_in(m).size(1), dtype=torch.float64) for n, m in modules.items()}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
            x = args[0].detach()
            sums[name] += x.reshape(-1, x.size(-1)).double().pow(2).sum(0).cpu()
        return hook

    def stop(mod: nn.Module, args: Any, out: Any) -> None:
        raise _Stop

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for b in batches:
            try:
                model(input_ids=b.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return sums


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The body's list of transformer blocks (llama-likes: `layers`, GPT-2: `h`)."""
    body = body_of(model)
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(body, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise UserError(f"cannot find the transformer blocks of {type(body).__name__}")


Norms = dict[str, torch.Tensor]  # module name -> (in,) squared input norms
PruneBlock = Callable[[str, nn.Module, dict[str, nn.Module], Norms | None], None]


def for_each_block(model: nn.Module, modules: dict[str, nn.Module], batches: list[torch.Tensor] | None,
                   sequential: bool, prune_block: PruneBlock) -> None:
    """Call `prune_block(block name, block, its modules, their input norms or None)` for every
    block in forward order. Sequential (Wanda's procedure): block i is measured with blocks < i
    already pruned, so its scores see the inputs the pruned model will really give it, and the
    forward pass stops after block i. Otherwise one pass over the dense model scores them all."""
    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    for block in blocks_of(model):
        inside = {id(m) for m in block.modules()}
        groups.append((names[id(block)], block, {n: m for n, m in modules.items() if id(m) in inside}))
    dense = input_sq_norms(model, modules, batches) if batches is not None and not sequential else None
    for name, block, mods in groups:
        norms = dense
        if batches is not None and sequential:
            norms = input_sq_norms(model, mods, batches, stop_after=block)
        prune_block(name, block, mods, norms)


# --------------------------------------------------------------------------- unstructured


def prune_unstructured(model: nn.Module, method: str, sparsity: float, scope: Literal["global", "layer"],
                       batches: list[torch.Tensor] | None, sequential: bool = True) -> None:
    """Zero weights of every block matrix in place. magnitude: |W| (global or per matrix);
    wanda: |W| x ||X|| per output row; 2:4: the 2 of every 4 with the highest scores, which
    are Wanda's when `batches` are given, else |W|."""
    modules = block_linears(model)
    if method == "2:4":
        bad = [f"{n} ({out_in(m).size(1)})" for n, m in modules.items() if out_in(m).size(1) % 4]
        if bad:
            raise UserError(f"method=2:4 needs in_features divisible by 4; {bad[0]} is not")
    if method == "magnitude":
        masks = magnitude_masks({n: out_in(m).detach() for n, m in modules.items()}, sparsity, scope)
        for n, m in modules.items():
            apply_mask(m, masks[n])
        return
    pattern = (lambda s: nm_mask(s, 2, 4)) if method == "2:4" else (lambda s: row_mask(s, sparsity))

    def prune_block(_: str, __: nn.Module, mods: dict[str, nn.Module], norms: Norms | None) -> None:
        for n, m in mods.items():
            w = out_in(m).detach()
            apply_mask(m, pattern(wanda_scores(w, norms[n]) if norms is not None else w.abs()))

    for_each_block(model, modules, batches, sequential, prune_block)


# --------------------------------------------------------------------------- structured


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what structured pruning cuts (module paths inside a block), and
    the config keys that must describe the result."""

    q: str | None  # output features: query heads (None: heads cannot be removed)
    kv: tuple[str, ...]  # output features: key/value heads
    o: str | None  # input features: query heads
    up: tuple[str, ...]  # output features: MLP neurons
    down: str  # input features: MLP neurons
    inner_key: str  # config key of the MLP width


LLAMA = Layout(q="self_attn.q_proj", kv=("self_attn.k_proj", "self_attn.v_proj"), o="self_attn.o_proj",
               up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", inner_key="intermediate_size")
# GPT-2's attention derives head size from n_embd / n_head and transformers 5 no longer reads
# config.pruned_heads: a GPT-2 with fewer heads is not describable by its config, so only
# its MLP is pruned
GPT2 = Layout(q=None, kv=(), o=None, up=("mlp.c_fc",), down="mlp.c_proj", inner_key="n_inner")
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gpt2": GPT2}


def group_importance(w_in: torch.Tensor, in_sq_norms: torch.Tensor | None, group: int) -> torch.Tensor:
    """Importance of each run of `group` consecutive input features of the matrix that reads
    them (o_proj: a head's slice; down_proj: one neuron): sum_j ||W[:, j]||^2 * ||X_j||^2, the
    energy the group adds to the residual stream if its features were uncorrelated (Wanda's
    score squared, summed over the group); without calibration ||X_j|| = 1.

    W = [[1, 2, 0, 1], [1, 0, 0, 1]], ||X||^2 = [1, 1, 4, 1], group 2 -> [2 + 4, 0 + 2] = [6, 2]."""
    col = w_in.detach().double().pow(2).sum(0)  # (in,)
    if in_sq_norms is not None:
        col = col * in_sq_norms.double()
    return col.view(-1, group).sum(1)


def keep_top(importance: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Indices (ascending) of all but the `n_drop` least important: order is preserved."""
    return torch.sort(torch.nonzero(lowest_k_mask(importance, n_drop)).flatten()).values


@torch.no_grad()
def keep_features(m: nn.Module, idx: torch.Tensor, side: Side) -> None:
    """Shrink Linear/Conv1D `m` in place to the output (or input) features `idx`."""
    linear = isinstance(m, nn.Linear)
    dim = {(True, "out"): 0, (True, "in"): 1, (False, "out"): 1, (False, "in"): 0}[(linear, side)]
    m.weight = nn.Parameter(m.weight.index_select(dim, idx.to(m.weight.device)).contiguous(),
                            requires_grad=m.weight.requires_grad)
    if side == "out" and m.bias is not None:
        m.bias = nn.Parameter(m.bias.index_select(0, idx.to(m.bias.device)).contiguous(),
                              requires_grad=m.bias.requires_grad)
    n = idx.numel()
    if linear:
        m.out_features, m.in_features = (n, m.in_features) if side == "out" else (m.out_features, n)
    else:
        m.nf, m.nx = (n, m.nx) if side == "out" else (m.nf, n)


def _refusal(conf: PretrainedConfig, groups: int, ratio: int, head_dim: int) -> str | None:
    """Why the config class refuses `groups` key/value groups (None: it loads). transformers 5
    validates configs on load, e.g. LlamaConfig wants hidden_size divisible by the number of
    heads even when head_dim is explicit; probing the class itself keeps every such rule."""
    try:
        type(conf).from_dict({**conf.to_dict(), "num_attention_heads": groups * ratio,
                              "num_key_value_heads": groups, "head_dim": head_dim})
    except Exception as e:  # the validators raise several unrelated types
        return str(e).strip().splitlines()[-1].strip()
    return None


def _check_loadable(conf: PretrainedConfig, share: float, keep: int, n_kv: int, ratio: int,
                    head_dim: int) -> None:
    why = _refusal(conf, keep, ratio, head_dim)
    if why is None:
        return
    ok = [g for g in range(n_kv - 1, 0, -1) if _refusal(conf, g, ratio, head_dim) is None]
    alts = ", ".join(f"{g * ratio} (heads={1 - g / n_kv:.3g})" for g in ok) or "none"
    raise UserError(f"heads={share} keeps {keep * ratio} of {n_kv * ratio} heads, which "
                    f"{type(conf).__name__} would not load ({why}); head counts that load: {alts}")


def count_to_drop(share: float, n: int, what: str) -> int:
    k = round(share * n)
    if k >= n:
        raise UserError(f"{what}={share} would remove all {n} per layer; at most {n - 1} can go "
                        f"(a share below {(n - 0.5) / n:.3g})")
    return k


def _drop_heads(block: nn.Module, lay: Layout, norms: Norms | None, n_drop: int, head_dim: int,
                ratio: int) -> list[int]:
    """Remove `n_drop` key/value groups (each with its `ratio` query heads); returns the
    groups kept. `norms` are keyed by module paths inside the block."""
    o = block.get_submodule(lay.o)  # type: ignore[arg-type]
    imp = group_importance(out_in(o), norms[lay.o] if norms else None, head_dim * ratio)
    kept = keep_top(imp, n_drop)
    q_idx = (kept[:, None] * head_dim * ratio + torch.arange(head_dim * ratio)).flatten()
    kv_idx = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
    keep_features(block.get_submodule(lay.q), q_idx, "out")  # type: ignore[arg-type]
    for name in lay.kv:
        keep_features(block.get_submodule(name), kv_idx, "out")
    keep_features(o, q_idx, "in")
    return kept.tolist()


def _drop_neurons(block: nn.Module, lay: Layout, norms: Norms | None, n_drop: int) -> int:
    down = block.get_submodule(lay.down)
    kept = keep_top(group_importance(out_in(down), norms[lay.down] if norms else None, 1), n_drop)
    for name in lay.up:
        keep_features(block.get_submodule(name), kept, "out")
    keep_features(down, kept, "in")
    return kept.numel()


def prune_structured(model: PreTrainedModel, heads: float, neurons: float,
                     batches: list[torch.Tensor] | None, sequential: bool = True) -> dict[str, Any]:
    """Remove the same number of key/value groups (with their query heads) and MLP neurons
    from every block, the least important ones (`group_importance`: activation-weighted when
    `batches` are given), and rewrite the config to describe the result. Returns what changed."""
    conf = model.config
    lay = LAYOUTS.get(conf.model_type)
    if lay is None:
        raise UserError(f"method=structured knows {', '.join(sorted(LAYOUTS))}, not "
                        f"model_type={conf.model_type!r}; use an unstructured method")
    if heads and lay.q is None:
        raise UserError(f"method=structured cannot remove heads of {conf.model_type}: its config "
                        "derives the head size from the width and heads, so fewer heads would not "
                        "load; set heads=0 (MLP neurons only)")
    n_heads = getattr(conf, "num_attention_heads", 0)
    n_kv = getattr(conf, "num_key_value_heads", None) or n_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // max(n_heads, 1)
    ratio = n_heads // n_kv if n_kv else 1
    inner = out_in(blocks_of(model)[0].get_submodule(lay.down)).size(1)
    drop_g = count_to_drop(heads, n_kv, "heads") if heads else 0
    drop_n = count_to_drop(neurons, inner, "neurons") if neurons else 0
    if drop_g:
        _check_loadable(conf, heads, n_kv - drop_g, n_kv, ratio, head_dim)
    kept_heads: list[list[int]] = []

    def prune_block(name: str, block: nn.Module, _: dict[str, nn.Module], norms: Norms | None) -> None:
        local = {k[len(name) + 1:]: v for k, v in norms.items() if k.startswith(name + ".")} if norms else None
        if drop_g:
            kept_heads.append(_drop_heads(block, lay, local, drop_g, head_dim, ratio))
        if drop_n:
            _drop_neurons(block, lay, local, drop_n)

    for_each_block(model, block_linears(model), batches, sequential, prune_block)
    changed: dict[str, Any] = {}
    if drop_g:
        changed["num_attention_heads"] = [n_heads, (n_kv - drop_g) * ratio]
        changed["num_key_value_heads"] = [n_kv, n_kv - drop_g]
        conf.num_attention_heads, conf.num_key_value_heads = (n_kv - drop_g) * ratio, n_kv - drop_g
    if drop_g or lay.q is not None:
        conf.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    if drop_n:
        changed[lay.inner_key] = [inner, inner - drop_n]
        setattr(conf, lay.inner_key, inner - drop_n)
    return {"config": changed, "heads_kept": kept_heads}


# --------------------------------------------------------------------------- recovery


def read_record(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The prune record saved with a model (None: the model was not pruned here)."""
    if model_dir is None:
        return None
    path = Path(resolve_model_dir(model_dir)) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable prune record ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("matrices"), dict):
        raise UserError(f"{path}: not a prune record (no \"matrices\" object)")
    return rec


def masked_record(model_dir: str | Path | None, lora_method: str = "full") -> dict[str, Any] | None:
    """The record when the model's zeros must survive training (an unstructured method), else
    None. An adapter cannot keep them: the merged W + BA is dense wherever BA is, so training
    one would silently undo the pruning; that is refused rather than repaired at export,
    where cutting BA to the mask would ship weights that no step of training produced."""
    rec = read_record(model_dir)
    if rec is None or rec.get("method") not in UNSTRUCTURED:
        return None
    if lora_method != "full":
        raise UserError(f"lora.method={lora_method}: {model_dir} was pruned ({rec['method']}, "
                        f"{rec.get('sparsity', 0):.0%} zeros) and a merged adapter is dense; "
                        "recover it with lora.method=full")
    return rec


class MaskKeeper:
    """Keeps a pruned model's zeros zero while it trains: gradients of pruned weights are
    masked (so clipping and Adam's moments see only the live ones) and the weights are
    re-zeroed after every optimizer step (`Task.after_step`), which holds for any optimizer."""

    def __init__(self, model: nn.Module, record: dict[str, Any]) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in record["matrices"] if n not in mods]
        if missing:
            raise UserError(f"the prune record names {missing[0]}, which this model lacks "
                            f"({len(missing)} such)")
        self.record = record
        self.modules = {n: mods[n] for n in record["matrices"]}
        self.masks = [(m.weight, m.weight.detach() != 0) for m in self.modules.values()]
        for p, keep in self.masks:
            p.register_hook(lambda g, keep=keep: g * keep)
        self.start = zero_share(self.modules)[1]

    def after_step(self) -> dict[str, float]:
        with torch.no_grad():
            for p, keep in self.masks:
                p.mul_(keep)
        return {}

    def line(self) -> str:
        return (f"pruned model ({self.record['method']}): keeping its {self.start:.1%} zeros in "
                f"{len(self.masks)} matrices through training (masked gradients, re-zeroed "
                "after every step)")

    def finish(self, final_dir: Path, stage: str, steps: int) -> dict[str, Any]:
        """Carry the record into the trained final/ (so a further stage keeps the mask too),
        with the sparsity measured on the weights final/ holds."""
        per = saved_zero_share(final_dir, list(self.modules))
        total = sum(per[n] * self.modules[n].weight.numel() for n in per) / max(
            sum(m.weight.numel() for m in self.modules.values()), 1)
        rec = {**self.record, "sparsity": total,
               "matrices": {n: {**self.record["matrices"][n], "sparsity": per[n]} for n in per},
               "recovered": [*self.record.get("recovered", []), {"stage": stage, "steps": steps}]}
        if distributed.current().main:
            (final_dir / RECORD).write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
            record_written(final_dir)
        return {"method": rec["method"], "sparsity_before": self.start, "sparsity_after": total}


def saved_zero_share(model_dir: Path, names: list[str]) -> dict[str, float]:
    """Share of zeros of each named module's weight as saved in `model_dir`'s safetensors."""
    from safetensors import safe_open

    want = {f"{n}.weight": n for n in names}
    out: dict[str, float] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in set(st.keys()) & want.keys():
                out[want[key]] = float((st.get_tensor(key) == 0).float().mean())
    if len(out) != len(names):
        lacking = next(n for n in names if n not in out)
        raise UserError(f"{model_dir} holds no weight for {lacking}, which the prune record names")
    return out


def keep_zeros(task: Any, model: nn.Module, record: dict[str, Any] | None,
               stage: str, parallel: str = "ddp") -> MaskKeeper | None:
    """Attach a MaskKeeper to a training stage's Task when `record` (from `masked_record`,
    read before the model loads) says the model's zeros must survive; None otherwise."""
    if record is None:
        return None
    if parallel == "fsdp" and distributed.current().active:
        raise UserError(f"train.parallel=fsdp: {stage} keeps a pruned model's zeros with masks "
                        "over whole weight matrices, which FSDP shards; use train.parallel=ddp")
    keeper = MaskKeeper(model, record)
    task.after_step = keeper.after_step
    print(f"{stage}: {keeper.line()}")
    return keeper

"""Load any checkpoint quantized, measure what it stores, export it so it reloads as is.

Methods (compress/config.py QuantMethod), all through transformers' own quantizers so an
exported directory loads with a plain `AutoModelForCausalLM.from_pretrained(dir)`:

- fp32 / bf16 / fp16: the weights cast; the reference row and the "half precision" rows.
- bnb-int8: LLM.int8() (Dettmers et al. 2022): int8 rows with one fp32 scale each; activation
  columns with a value above `int8_threshold` run through an fp16 matmul instead.
- bnb-nf4 / bnb-fp4 (+ -dq): 4-bit weights in blocks of 64 with one absmax each; -dq quantizes
  those absmax constants again to 8 bits (QLoRA's double quantization).
- torchao-int8wo / torchao-int4wo / torchao-int8dq: torchao tensor subclasses (weight-only
  int8 per row, weight-only int4 per group, int8 weights with int8 dynamic activations).

Embeddings, the output layer and norms stay as loaded (fp32): both libraries quantize only
the transformer's Linear layers, which is why a small-vocabulary model shrinks less than 4x.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lmforge.compress.config import QuantizeCfg
from lmforge.errors import UserError
from lmforge.io import check_local_or_hub
from lmforge.models import bnb_config, resolve_model_dir
from lmforge.train.precision import DTYPES, choose, cpu_features

# bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16 (what LLM.int8
# does by design), and on import that an optional CPU kernel package is absent (its fallback
# is what runs); torchao's and torch's import chatter is quieted in lmforge/__init__.py
for _name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

INSTALL = "pip install 'lmforge[quant]'"
RECORD = "quantization.json"  # what `lmforge quantize` wrote: method, settings, versions
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size (transformers' default, not configurable there)
INT4_GROUPS = (128, 64, 32)  # torchao int4 group sizes tried, largest (fewest scales) first
FP16_FLAGS = {"avx512_fp16", "amx_fp16"}
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
DTYPES_BY_METHOD = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device=cuda: torch {torch.__version__} sees no CUDA device here")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def _library(method: str) -> str | None:
    return {"bnb": "bitsandbytes", "torchao": "torchao"}.get(method.split("-")[0])


def source_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config, refused when it is already quantized: a second quantization
    on top of the first is not what any row of the table means."""
    path = resolve_model_dir(path)
    check_local_or_hub(path, "model")
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    q = getattr(conf, "quantization_config", None)
    if q is not None:
        kind = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", q)
        raise UserError(f"{path} is already quantized ({kind}); quantize a full-precision "
                        "checkpoint")
    return conf


def linear_shapes(conf: PretrainedConfig) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the Linear layers a quantizer converts (all but
    the output layer), read from a weightless copy of the model (meta device: no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    head = model.get_output_embeddings()
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head]


def int4_group_size(shapes: list[tuple[str, int, int]]) -> int | None:
    """The largest group size that divides every layer's input width (torchao skips a layer
    it cannot group, silently leaving it in full precision)."""
    return next((g for g in INT4_GROUPS if all(i % g == 0 for _, i, _ in shapes)), None)


def _bnb_packs_for_cpu() -> bool:
    """bitsandbytes' own probe: on a CPU with AVX512-BF16 its 4-bit inference repacks weights
    for a bf16 kernel, which needs widths that divide into its tiles."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def unsupported(method: str, device: str, conf: PretrainedConfig | None = None) -> str | None:
    """Why `method` cannot run on `device` (for this model's shapes when `conf` is given), or
    None. Slow is not unable: fp16 on a CPU without fp16 instructions runs, and its row says
    how slow (see `note`)."""
    lib = _library(method)
    if lib is not None and importlib.util.find_spec(lib) is None:
        return f"needs {lib}: {INSTALL}"
    if conf is None:
        return None
    shapes = linear_shapes(conf)
    if method.startswith("torchao-int4") and int4_group_size(shapes) is None:
        bad = next(s for s in shapes if s[1] % INT4_GROUPS[-1])
        return f"int4 groups of {INT4_GROUPS[-1]} do not divide {bad[0]}'s {bad[1]} inputs"
    if (method in ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq") and device == "cpu"
            and _bnb_packs_for_cpu()):
        bad = [s for s in shapes if s[1] % BNB_BLOCK or s[2] % 32]
        if bad:
            return (f"bitsandbytes' AVX512-BF16 4-bit kernel needs inputs divisible by "
                    f"{BNB_BLOCK} and outputs by 32; {bad[0][0]} is {bad[0][1]} -> {bad[0][2]}")
    return None


def _cuda_major() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


def note(method: str, device: str, conf: PretrainedConfig | None = None) -> str:
    """What actually runs for `method` here, when that is not what its name suggests."""
    feats = set(cpu_features())
    low_isa = any(f.startswith("torch:") and "avx512" not in f for f in feats)
    if device == "cpu" and method == "fp16" and (low_isa or not FP16_FLAGS & feats):
        return "no fp16 instructions here: matmuls emulated (slow)"
    if device == "cpu" and method == "bf16" and (low_isa or not BF16_FLAGS & feats):
        return "no bf16 instructions here: matmuls emulated (slow)"
    if method == "bnb-int8" and device == "cpu":
        int_mm = torch.backends.cpu.get_cpu_capability() == "AVX512"
        return ("int8 matmul by torch._int_mm" if int_mm else
                "no AVX512 for torch._int_mm: int8 values multiplied as fp32 (bitsandbytes' fallback)")
    if method.startswith("bnb-") and "4" in method and device == "cpu" and _bnb_packs_for_cpu():
        return "bitsandbytes' AVX512-BF16 kernel: bf16 matmuls whatever compute_dtype says"
    if method == "torchao-int4wo":
        g = int4_group_size(linear_shapes(conf)) if conf is not None else None
        group = f"group size {g}" if g else "grouped"
        if device == "cuda" and _cuda_major() >= 8:
            return f"{group}, tinygemm int4 kernel (bf16 activations)"
        return f"{group}; int4 values stored one per byte (torchao packs int4 only for GPUs)"
    return ""


def compute_dtype(cfg: QuantizeCfg, device: str) -> torch.dtype:
    """The 4-bit matmul dtype: `auto` picks bf16 only where it measures fast on this device."""
    return DTYPES[choose(cfg.compute_dtype, device).name]


def _torchao_config(method: str, device: str, conf: PretrainedConfig) -> Any:
    import torchao.quantization as Q
    from transformers import TorchAoConfig

    if method == "torchao-int8wo":
        return TorchAoConfig(Q.Int8WeightOnlyConfig())
    if method == "torchao-int8dq":
        return TorchAoConfig(Q.Int8DynamicActivationInt8WeightConfig())
    group = int4_group_size(linear_shapes(conf))
    assert group is not None  # `unsupported` refused this model already
    if device == "cuda" and _cuda_major() >= 8:
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (
            Int4PackingFormat,
        )

        return TorchAoConfig(Q.Int4WeightOnlyConfig(
            group_size=group, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D))
    # torchao 0.18 has no x86 CPU int4 packing: Int4WeightOnlyConfig's CPU-less layouts fail
    # at load, while the intx workflow runs anywhere (values in [-8, 7], one per int8 byte)
    from torchao.quantization.granularity import PerGroup

    return TorchAoConfig(Q.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                granularity=PerGroup(group)))


def quantization_config(method: str, cfg: QuantizeCfg, device: str,
                        conf: PretrainedConfig) -> tuple[Any, torch.dtype]:
    """(the transformers quantization config or None, the dtype everything else loads in)."""
    if method in DTYPES_BY_METHOD:
        return None, DTYPES_BY_METHOD[method]
    if method == "bnb-int8":
        return bnb_config(8, f"method={method}", int8_threshold=cfg.int8_threshold), torch.float32
    if method.startswith("bnb-"):
        kind = method.split("-")[1]
        return bnb_config(4, f"method={method}", quant_type=kind,
                          double_quant=method.endswith("-dq"),
                          compute_dtype=compute_dtype(cfg, device)), torch.float32
    if importlib.util.find_spec("torchao") is None:
        raise UserError(f"method={method} needs torchao: {INSTALL}")
    dtype = torch.bfloat16 if "int4" in method and device == "cuda" and _cuda_major() >= 8 else torch.float32
    return _torchao_config(method, device, conf), dtype



def load_quantized_as(path: str, method: str, cfg: QuantizeCfg, device: str) -> PreTrainedModel:
    """The checkpoint at `path` (a local dir, stage dir or hub id) loaded as `method` on
    `device`, in eval mode. A method this device cannot run is one line (UserError)."""
    conf = source_config(path, cfg.model.trust_remote_code)
    why = unsupported(method, device, conf)
    if why is not None:
        raise UserError(f"method={method} cannot run on {device}: {why}")
    qconf, dtype = quantization_config(method, cfg, device, conf)
    kw: dict[str, Any] = {"quantization_config": qconf} if qconf is not None else {}
    if qconf is not None and device == "cuda":
        kw["device_map"] = device  # quantizers place weights while loading them
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(path), dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, **kw)
    if qconf is None and device == "cuda":
        model.to(device)
    model.eval()
    return model  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- bytes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's storage takes, counting what quantized tensors carry beside their
    data: a torchao subclass is the sum of its inner tensors (data, scales, zero points);
    bitsandbytes keeps int8 row scales (SCB) and 4-bit block constants (quant_state) as
    attributes of the parameter."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        n += scb.numel() * scb.element_size()
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        parts = [qs.absmax, qs.code]
        if getattr(qs, "nested", False):
            parts += [qs.state2.absmax, qs.state2.code, torch.as_tensor(qs.offset)]
        n += sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return n


def weight_bytes(model: nn.Module) -> int:
    """Real bytes of the model's weights as stored (tied weights once), scales included.
    Read before the first forward: bitsandbytes repacks 4-bit weights for CPU kernels then."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_bytes(p)
    return total


# --------------------------------------------------------------------------- export


def versions() -> dict[str, str | None]:
    import transformers

    out: dict[str, str | None] = {"torch": torch.__version__, "transformers": transformers.__version__}
    for lib in ("bitsandbytes", "torchao"):
        try:
            out[lib] = importlib.import_module(lib).__version__ if importlib.util.find_spec(lib) else None
        except Exception:  # a broken install is reported as such, not as a crash
            out[lib] = "unimportable"
    return out


def export_record(method: str, cfg: QuantizeCfg, device: str, source: str,
                  conf: PretrainedConfig) -> dict[str, Any]:
    """What `quantization.json` says next to the weights: enough to redo the export."""
    rec: dict[str, Any] = {"method": method, "source": source, "device": device,
                           "note": note(method, device, conf), "versions": versions()}
    if method == "bnb-int8":
        rec["int8_threshold"] = cfg.int8_threshold
    if method.startswith("bnb-") and method != "bnb-int8":
        rec["compute_dtype"] = str(compute_dtype(cfg, device)).removeprefix("torch.")
        rec["double_quant"] = method.endswith("-dq")
    if method == "torchao-int4wo":
        rec["group_size"] = int4_group_size(linear_shapes(conf))
    return rec


def record_json(rec: dict[str, Any]) -> str:
    return json.dumps(rec, indent=2, sort_keys=True) + "\n"


def read_record(d: Path) -> dict[str, Any] | None:
    try:
        out = json.loads((d / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None

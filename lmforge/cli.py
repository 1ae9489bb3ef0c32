"""argv -> config -> stage function; nothing else.

`lmforge STAGE [CONFIG.yaml] [a.b=c ...]`. Exit 0 on success, 2 on a user error (one line on
stderr), 1 on a bug or a failed run, 130/143 on SIGINT/SIGTERM after a clean checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from lmforge.errors import Interrupted, Terminated, TrainingError, UserError
from lmforge.io import storage_error
from lmforge.stages import STAGES

SYNTH = {"pairs": "pairs", "best-of-n": "best_of_n", "self-instruct": "self_instruct",
         "constitutional": "constitutional"}  # `lmforge synth KIND` -> its stage
BENCH = {"quantize": "quantize"}  # `lmforge bench KIND CHECKPOINT` -> the stage that measures it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="lmforge: train, align, compress and serve language models, measuring every step.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage")
        s.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.path=value")
        if name == "eval":
            _eval_flags(s)
        if name == "quantize":
            _quantize_flags(s, bench=False)
        if name == "sft":
            s.add_argument("--preview", type=int, default=0, metavar="N",
                           help="print N rendered training examples, loss tokens in [[...]], and exit")
    y = sub.add_parser("synth", help="make training data with a model: `synth pairs` (preference "
                       "pairs judged by running the answers' tests), `synth best-of-n` (the best "
                       "of n answers as SFT data, and best-of-k pass@1), `synth self-instruct` "
                       "(new tasks and answers grown from seed tasks), `synth constitutional` "
                       "(responses critiqued and revised against principles: SFT rows and "
                       "preference pairs)")
    y.add_argument("kind", choices=sorted(SYNTH), help="what to make")
    y.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.path=value")
    b = sub.add_parser("bench", help="measure a checkpoint side by side: `bench quantize CKPT` "
                       "(one row per quantization method)")
    b.add_argument("kind", choices=sorted(BENCH), help="what to compare")
    b.add_argument("args", nargs="+", metavar="CHECKPOINT [key.path=value ...]")
    _quantize_flags(b, bench=True)
    _plan_flags(sub.add_parser("plan", help="size a run before it starts: Chinchilla tokens, "
                               "memory per GPU (DDP, ZeRO-1/2/3; full, LoRA, QLoRA), bubbles"))
    m = sub.add_parser("merge", help="merge a LoRA/DoRA/QLoRA adapter into its base model")
    m.add_argument("adapter", type=Path, help="an adapter dir (e.g. runs/demo/sft/final/adapter)")
    m.add_argument("--base", help="base model dir or hub id (default: the adapter's own record)")
    m.add_argument("--out", type=Path, required=True, help="where the merged HF directory goes")
    m.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files lmforge did not write")
    r = sub.add_parser("run", help="run a pipeline of stages")
    r.add_argument("pipeline", type=Path)
    r.add_argument("overrides", nargs="*", metavar="[STAGE.]key.path=value")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo this stage (and the stages that consume it) even if it finished; "
                        "repeatable; 'all' redoes every stage")
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a checkpoint")
    v.add_argument("ckpt", help="an HF directory (e.g. runs/demo/grpo/final)")
    v.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY`")
    v.add_argument("--max-batch", type=int, default=32, help="rows sampled together")
    v.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond this get HTTP 429")
    v.add_argument("--model-name", help="the name clients ask for (default: CKPT as given)")
    v.add_argument("--lora", action="append", default=[], metavar="NAME=ADAPTER_DIR",
                   help="serve a LoRA adapter of CKPT as model NAME next to the base (repeatable)")
    v.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="hf: lmforge's own server; vllm: vLLM's own OpenAI server (run "
                        "from .venv-vllm if vLLM does not import here; --max-queue is not used)")
    u = sub.add_parser("ui", help="the runs dashboard (stages, live curves, eval tables, config "
                       "diffs, samples, reports) and preference annotation, in the browser")
    u.add_argument("--runs", default="runs", help="the runs directory to show (never written)")
    u.add_argument("--labels", default="annotations",
                   help="annotation sessions (made by `lmforge annotate`); labels go there")
    u.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    u.add_argument("--port", type=int, default=8765)
    u.add_argument("--token", help="required with a non-loopback --host; every request must "
                   "carry it (open /?token=TOKEN once in the browser)")
    a = sub.add_parser("annotate", help="prepare a preference-annotation session: answers of "
                       "two or more checkpoints to a prompt set, or a pairs/KTO file to relabel")
    a.add_argument("out", help="the session directory (e.g. annotations/sft-vs-dpo)")
    a.add_argument("--prompts", help=".txt (one a line) or .jsonl/.json rows with \"prompt\"")
    a.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="a checkpoint to answer the prompts (repeatable, two or more)")
    a.add_argument("--relabel", help="a preference pairs or KTO file whose answers to label")
    a.add_argument("--thumbs", action="store_true",
                   help="label each answer up/down (writes kto.jsonl) instead of pairs")
    a.add_argument("--limit", type=int, help="the first N prompts or rows")
    a.add_argument("--max-new-tokens", type=int, default=256)
    a.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0, help="sampling, and each annotator's order")
    g = sub.add_parser("generate", help="sample text from an HF model directory")
    g.add_argument("model", help="an HF directory (e.g. runs/demo/pretrain/final) or hub id")
    g.add_argument("--prompt", action="append", default=[], help="repeatable; default: ''")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true",
                   help="prompts are user turns, rendered with the model's own chat template")
    c = sub.add_parser("chat", help="talk to a chat model in the terminal, in its own chat "
                       "template (/reset, /exit)")
    c.add_argument("model", help="an HF directory with a chat template (e.g. runs/demo/sft/final)")
    c.add_argument("--system", help="system prompt (kept through /reset and history trimming)")
    c.add_argument("--max-new-tokens", type=int,
                   help="reply length cap (default: 256 or half the context, whichever is less)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=0)
    return p


def _plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset (nano, tiny, small, gpt2-124m), a parameter count "
                   "(7e9, 70B), or an HF model dir / config.json / hub id")
    p.add_argument("--vocab", type=int, default=32000, help="a preset's vocabulary size")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs")
    p.add_argument("--gpu-mem", type=float, default=80, help="GB per GPU")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--method", choices=["full", "lora", "qlora", "all"], default="all")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--compute", type=float, help="a FLOPs budget: its compute-optimal size")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per pipeline step")


def _eval_flags(s: argparse.ArgumentParser) -> None:
    s.description = ("`lmforge eval CHECKPOINT [flags] [key=value ...]` or "
                     "`lmforge eval CONFIG.yaml [key=value ...]`")
    s.add_argument("--task", action="append", default=[], metavar="T[,T...]",
                   help="synthetic-code, mbpp, mbpp-sanitized, humaneval, gsm8k, "
                        "perplexity:PATH, text:PATH (repeatable or comma-separated)")
    s.add_argument("--k", help="pass@k for these k, e.g. 1,5,10 (needs n >= k)")
    s.add_argument("--n", type=int, help="samples per task")
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--limit", type=int, help="the first N items of each task")
    s.add_argument("--out", help="output directory (run.dir)")
    s.add_argument("--contamination", action="append", default=[], metavar="TRAIN",
                   help="training text (corpus stage dir, .jsonl/.json/.txt) to scan for "
                        "n-gram overlap with the tasks' items (repeatable)")
    s.add_argument("--judge", help="judge model: an HF dir or an OpenAI-compatible URL")
    s.add_argument("--judge-model", help="model name to ask an endpoint judge for")
    s.add_argument("--baseline", help="the model the judge compares this one with")
    s.add_argument("--backend", choices=("hf", "vllm"), help="what samples the answers "
                   "(vllm: run from .venv-vllm, or where vLLM is installed)")


def _next_to(checkpoint: str, name: str) -> Path:
    """Next to the checkpoint: runs/x/sft/final -> runs/x/sft/NAME (never inside an HF dir);
    a hub id -> runs/NAME/<id>."""
    p = Path(checkpoint.rstrip("/"))
    if not p.exists():
        return Path("runs") / name / checkpoint.replace("/", "__")
    return p.parent / name if (p / "config.json").exists() else p / name


def _quantize_flags(s: argparse.ArgumentParser, bench: bool) -> None:
    if bench:
        s.description = ("`lmforge bench quantize CHECKPOINT [--methods a,b] [--text PATH] "
                         "[--out DIR] [key=value ...]`: one row per method, fp32 the reference")
        s.add_argument("--methods", help="comma-separated, e.g. fp32,fp16,bnb-int8,bnb-nf4 "
                       "(default: all)")
        s.add_argument("--text", help="held-out text for perplexity and KL (.txt, .jsonl, or a "
                       "corpus stage dir); default: held-out synthetic-code problems")
    else:
        s.description = ("`lmforge quantize CHECKPOINT --method M [--out DIR]` or "
                         "`lmforge quantize CONFIG.yaml [key=value ...]`")
        s.add_argument("--method", help="fp32, bf16, fp16, bnb-int8, bnb-nf4[-dq], "
                       "bnb-fp4[-dq], torchao-int8wo, torchao-int4wo, torchao-int8dq")
    s.add_argument("--out", help="output directory (run.dir; the export goes to its final/)")
    s.add_argument("--threshold", type=float, help="LLM.int8 outlier threshold (int8_threshold)")
    s.add_argument("--compute-dtype", help="4-bit matmul dtype: auto, fp32, bf16, fp16")
    s.add_argument("--device", help="auto, cpu, cuda")


def _quantize_overrides(ns: argparse.Namespace, args: list[str], bench: bool
                        ) -> tuple[Path | None, list[str]]:
    """`quantize CHECKPOINT --method M` / `bench quantize CHECKPOINT` become the quantize
    stage's config: flags are overrides (quoted as JSON, so YAML reads them as typed)."""
    path: Path | None = None
    over: list[str] = []
    if args and "=" not in args[0]:
        if args[0].endswith((".yaml", ".yml")) and not bench:
            path = Path(args[0])
        else:
            where = "quantize-bench" if bench else f"quantize-{ns.method or 'bnb-int8'}"
            out = ns.out or str(_next_to(args[0], where))
            over += [f"model.path={json.dumps(args[0])}", f"run.dir={json.dumps(out)}"]
        args = args[1:]
    elif ns.out:
        over.append(f"run.dir={json.dumps(ns.out)}")
    if bench:  # the table only; `bench={}` turns it on with its defaults
        over += ["method=null", "bench={}"]
        if ns.methods:
            over.append(f"bench.methods={json.dumps([m.strip() for m in ns.methods.split(',') if m.strip()])}")
        if ns.text:
            over.append(f"bench.text={json.dumps(ns.text)}")
    elif ns.method:
        over.append(f"method={json.dumps(ns.method)}")
    flags = {"int8_threshold": ns.threshold, "compute_dtype": ns.compute_dtype, "device": ns.device}
    over += [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items()
             if v is not None]
    return path, over + args


def _eval_overrides(ns: argparse.Namespace, args: list[str]) -> tuple[Path | None, list[str]]:
    """`eval CHECKPOINT --task ...` becomes the stage's config: flags are overrides."""
    path: Path | None = None
    over: list[str] = []
    # text from flags is quoted (JSON is YAML): `perplexity:` or a path with ` #` or `: ` in
    # it must reach the config as the string typed, not as YAML's reading of it
    if args and "=" not in args[0]:
        if args[0].endswith((".yaml", ".yml")):
            path = Path(args[0])
        else:
            out = ns.out or str(_next_to(args[0], "eval"))
            over += [f"model.path={json.dumps(args[0])}", f"run.dir={json.dumps(out)}"]
        args = args[1:]
    elif ns.out:
        over.append(f"run.dir={json.dumps(ns.out)}")
    tasks = [t for arg in ns.task for t in arg.split(",") if t]
    flags = {"tasks": tasks or None, "n": ns.n, "temperature": ns.temperature,
             "batch_size": ns.batch_size, "limit": ns.limit,
             "contamination.train": ns.contamination or None, "judge.judge": ns.judge,
             "judge.judge_model": ns.judge_model, "judge.baseline": ns.baseline,
             "backend": ns.backend,
             "k": [x.strip() for x in ns.k.split(",")] if ns.k else None}
    for key, value in flags.items():
        if value is None:
            continue
        if key == "k":  # numbers as typed, so `--k x` is refused as "x", not as a string
            shown = "[" + ",".join(value) + "]"
        elif isinstance(value, (list, str)):
            shown = json.dumps(value)
        else:  # argparse numbers; `nan`/`inf` reach the schema, which refuses them
            shown = str(value)
        over.append(f"{key}={shown}")
    return path, over + args


def _split_args(args: list[str]) -> tuple[Path | None, list[str]]:
    if args and "=" not in args[0]:
        return Path(args[0]), args[1:]
    return None, args


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.command == "run":
        from lmforge.pipeline import run_pipeline

        run_pipeline(ns.pipeline, force=ns.force, overrides=ns.overrides)
        return 0
    if ns.command == "generate":
        from lmforge.generate import generate_cli

        generate_cli(ns)
        return 0
    if ns.command == "chat":
        from lmforge.chat_repl import chat_cli

        return chat_cli(ns)
    if ns.command == "serve":
        from lmforge.serve import serve_cli

        serve_cli(ns)
        return 0
    if ns.command == "ui":
        from lmforge.ui.app import ui_cli

        ui_cli(ns)
        return 0
    if ns.command == "annotate":
        from lmforge.annotate import annotate_cli

        annotate_cli(ns)
        return 0
    if ns.command == "plan":
        from lmforge.plan import plan_cli

        plan_cli(ns)
        return 0
    if ns.command == "merge":
        from lmforge.models import merge_cli

        merge_cli(ns.adapter, ns.base, ns.out, force=ns.force)
        return 0
    from lmforge.config import load_config
    from lmforge.stages import run_stage

    if ns.command == "synth":
        ns.command = SYNTH[ns.kind]
    if ns.command == "bench":
        ns.command = BENCH[ns.kind]
        path, overrides = _quantize_overrides(ns, ns.args, bench=True)
    elif ns.command == "quantize":
        path, overrides = _quantize_overrides(ns, ns.args, bench=False)
    elif ns.command == "eval":
        path, overrides = _eval_overrides(ns, ns.args)
    else:
        path, overrides = _split_args(ns.args)
    cfg = load_config(STAGES[ns.command], path, overrides)
    if getattr(ns, "preview", 0):
        from lmforge.stages.sft import preview

        preview(cfg, ns.preview)  # type: ignore[arg-type]
        return 0
    summary = run_stage(ns.command, cfg)
    print(f"{ns.command}: done in {summary['wall_time_s']:.1f}s -> {cfg.run.dir}")  # type: ignore[attr-defined]
    return 0


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (exit 143): by default it kills the process on the spot,
    leaving temp files and sandbox dirs behind. The training loop installs its own handler
    (a checkpoint first) while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # `sft C.yaml --preview 2 a.b=c`: overrides after an option are still overrides
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(ns, "args") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.args = [*ns.args, *extra]
    from lmforge.train import distributed

    try:
        with _sigterm_raises(), distributed.session():
            return _dispatch(ns)
    except UserError as e:
        if distributed.launch_rank() == 0:  # under torchrun every rank meets it: one says
            print(f"lmforge {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingError as e:
        print(f"lmforge {ns.command}: failed: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"lmforge {ns.command}: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"lmforge {ns.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lmforge {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # a full disk or an unwritable place, wherever a stage met it: one line, exit 2
        out = getattr(ns, "out", None)
        msg = storage_error(e, Path(out) if out else None)
        if msg is None:
            raise
        print(f"lmforge {ns.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

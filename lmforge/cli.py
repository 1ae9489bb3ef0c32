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

SYNTH = {"pairs": "pairs"}  # `lmforge synth KIND` -> the stage that makes it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="lmforge: train, align, compress and serve language models, measuring every step.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage")
        s.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.path=value")
        if name == "eval":
            _eval_flags(s)
        if name == "sft":
            s.add_argument("--preview", type=int, default=0, metavar="N",
                           help="print N rendered training examples, loss tokens in [[...]], and exit")
    y = sub.add_parser("synth", help="make training data with a model: `synth pairs` (preference "
                       "pairs judged by running the answers' tests)")
    y.add_argument("kind", choices=sorted(SYNTH), help="what to make")
    y.add_argument("args", nargs="*", metavar="CONFIG.yaml | key.path=value")
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
    return p


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


def _eval_dir(checkpoint: str) -> Path:
    """Next to the checkpoint: runs/x/sft/final -> runs/x/sft/eval (never inside an HF dir);
    a hub id -> runs/eval/<id>."""
    p = Path(checkpoint.rstrip("/"))
    if not p.exists():
        return Path("runs/eval") / checkpoint.replace("/", "__")
    return p.parent / "eval" if (p / "config.json").exists() else p / "eval"


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
            out = ns.out or str(_eval_dir(args[0]))
            over += [f"model.path={json.dumps(args[0])}", f"run.dir={json.dumps(out)}"]
        args = args[1:]
    elif ns.out:
        over.append(f"run.dir={json.dumps(ns.out)}")
    tasks = [t for arg in ns.task for t in arg.split(",") if t]
    flags = {"tasks": tasks or None, "n": ns.n, "temperature": ns.temperature,
             "batch_size": ns.batch_size, "limit": ns.limit,
             "contamination.train": ns.contamination or None, "judge.judge": ns.judge,
             "judge.judge_model": ns.judge_model, "judge.baseline": ns.baseline,
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
    if ns.command == "merge":
        from lmforge.models import merge_cli

        merge_cli(ns.adapter, ns.base, ns.out, force=ns.force)
        return 0
    from lmforge.config import load_config
    from lmforge.stages import run_stage

    if ns.command == "synth":
        ns.command = SYNTH[ns.kind]
    if ns.command == "eval":
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
    try:
        with _sigterm_raises():
            return _dispatch(ns)
    except UserError as e:
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

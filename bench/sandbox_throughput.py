"""Sandbox throughput: executions per second of MBPP reference solutions with their tests.

    python bench/sandbox_throughput.py [--n 200] [--mbpp ../shared/data/mbpp/mbpp.jsonl]

Rows: lmforge's sandbox with its namespaces (strong where the kernel permits), without them
(the weak fallback), and the peer most harnesses amount to: a plain `python -c` subprocess
with a timeout and no isolation at all, measured in the same run on the same programs.
Every row checks that all reference solutions pass (a fast wrong harness is no harness).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge import sandbox  # noqa: E402
from lmforge.tasks.mbpp import load_mbpp  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def plain(program: str) -> bool:
    r = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True,
                       timeout=10, stdin=subprocess.DEVNULL)
    return r.returncode == 0


def rate(run: Callable[[list[str], int], list[bool]], programs: list[str], workers: int
         ) -> tuple[float, int]:
    run(programs[:4], workers)  # warm up
    t0 = time.perf_counter()
    ok = run(programs, workers)
    return len(programs) / (time.perf_counter() - t0), sum(ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbpp", type=Path, default=DEFAULT)
    ap.add_argument("--n", type=int, default=200, help="programs per row")
    args = ap.parse_args()
    if not args.mbpp.exists():
        sys.exit(f"MBPP not found at {args.mbpp}: pass --mbpp PATH")
    items = load_mbpp(args.mbpp, split="test", n_shot=0)[:args.n]
    programs = [it.program(it.reference) for it in items]

    def boxed(namespaces: bool) -> Callable[[list[str], int], list[bool]]:
        limits = sandbox.Limits(timeout_s=10, namespaces=namespaces)
        return lambda ps, w: [r.passed for r in sandbox.run_many(ps, limits, workers=w)]

    def peer(ps: list[str], w: int) -> list[bool]:
        with ThreadPoolExecutor(w) as pool:
            return list(pool.map(plain, ps))

    level = sandbox.probe().describe()
    print(f"{len(programs)} MBPP test-split reference solutions; sandbox here: {level}\n")
    print("| runner | workers | executions/s | passed |")
    print("|---|---:|---:|---:|")
    for name, fn in (("lmforge sandbox (namespaces)", boxed(True)),
                     ("lmforge sandbox (fallback, no namespaces)", boxed(False)),
                     ("peer: plain subprocess, no isolation", peer)):
        for workers in (1, 2):
            r, ok = rate(fn, programs, workers)
            print(f"| {name} | {workers} | {r:.1f} | {ok}/{len(programs)} |")


if __name__ == "__main__":
    main()

"""Sandbox throughput: executions per second of MBPP reference solutions with their tests.

    python bench/sandbox_throughput.py [--n 200] [--mbpp ../shared/data/mbpp/mbpp.jsonl]

Rows: lmforge's sandbox on its pre-forked workers (the default wherever its namespaces hold),
the same isolation started from scratch for every run (one shot), without namespaces (the
weak fallback, one shot), and the peer most harnesses amount to: a plain `python -c`
subprocess with a timeout and no isolation at all, measured in the same run on the same
programs. Every row checks that all reference solutions pass (a fast wrong harness is no
harness). The workers are started before a row's clock starts (the warm-up call), as a
reward loop reuses them across calls; `--cold` adds a row that pays for their start.
Programs whose own computation takes seconds (mbpp/123 sums amicable numbers below 10,000 for
~3 s under any runner) are named and left out: one of them would bound a 2-worker row by
itself. `--slow-s 1e9` keeps them.
"""

from __future__ import annotations

import argparse
import statistics
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


Run = Callable[[list[str], int], list[tuple[bool, float]]]  # (passed, seconds) per program


def plain(program: str) -> tuple[bool, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    return r.returncode == 0, time.perf_counter() - t0


def peer(programs: list[str], workers: int) -> list[tuple[bool, float]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(plain, programs))


def boxed(namespaces: bool, prefork: bool = True) -> Run:
    limits = sandbox.Limits(timeout_s=60, namespaces=namespaces, prefork=prefork)
    return lambda ps, w: [(r.passed, r.duration_s)
                          for r in sandbox.run_many(ps, limits, workers=w)]


def row(name: str, run: Run, programs: list[str], workers: int, warm: bool = True) -> str:
    if warm:
        run(programs[:4], workers)
    t0 = time.perf_counter()
    out = run(programs, workers)
    took = time.perf_counter() - t0
    ok, p50 = sum(o for o, _ in out), statistics.median(s for _, s in out) * 1e3
    return f"| {name} | {workers} | {len(programs) / took:.1f} | {p50:.1f} | {ok}/{len(programs)} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbpp", type=Path, default=DEFAULT)
    ap.add_argument("--n", type=int, default=200, help="programs per row")
    ap.add_argument("--slow-s", type=float, default=0.5,
                    help="leave out programs that take longer than this in a plain subprocess")
    ap.add_argument("--cold", action="store_true", help="also time a call that starts the workers")
    args = ap.parse_args()
    if not args.mbpp.exists():
        sys.exit(f"MBPP not found at {args.mbpp}: pass --mbpp PATH")
    items = load_mbpp(args.mbpp, split="test", n_shot=0)
    everything = [it.program(it.reference) for it in items]
    # a program that computes for seconds measures the CPU, not the runner: found here, in the
    # peer, and named, rather than left to decide a 2-worker row by itself
    timed = peer(everything[:args.n + 10], 1)
    slow = [(it.task_id, s) for it, (_, s) in zip(items, timed) if s > args.slow_s]
    programs = [p for it, p in zip(items, everything) if it.task_id not in dict(slow)][:args.n]
    print(f"{len(programs)} MBPP test-split reference solutions, the first {args.n} that take at "
          f"most {args.slow_s} s in a plain subprocess; left out: "
          + (", ".join(f"{t} ({s:.1f} s)" for t, s in slow) or "none"))
    print(f"sandbox here: {sandbox.probe(sandbox.Limits(prefork=False)).describe()} (one shot), "
          f"{sandbox.probe().describe()} (workers)\n")
    print("| runner | workers | executions/s | median ms/run | passed |")
    print("|---|---:|---:|---:|---:|")
    if args.cold:
        sandbox.close_pool()
        print(row("lmforge sandbox, pre-forked workers, started in the timed call", boxed(True),
                  programs, 2, warm=False))
    for name, fn in (("lmforge sandbox, pre-forked workers (namespaces)", boxed(True)),
                     ("lmforge sandbox, one shot (namespaces)", boxed(True, prefork=False)),
                     ("lmforge sandbox, one shot (fallback, no namespaces)", boxed(False)),
                     ("peer: plain subprocess, no isolation", peer)):
        for workers in (1, 2):
            print(row(name, fn, programs, workers))


if __name__ == "__main__":
    main()

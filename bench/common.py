"""What the benchmark scripts that write a report share: the machine line every figure is
printed next to, and report.md (a head line, the table, the plot) written and echoed."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.train.precision import cpu_features, cpu_name


def machine() -> str:
    return f"CPU: {cpu_name()} [{' '.join(cpu_features())}], {os.cpu_count()} cores"


def write_report(out: Path, title: str, head: str, table: str, image: str, alt: str) -> None:
    (out / "report.md").write_text(f"# {title}\n\n{head}\n\n{table}\n\n![{alt}]({image})\n")
    print(f"\n{head}\n\n{table}\n\nplot and report: {out}")

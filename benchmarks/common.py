"""Shared benchmark plumbing: machine description and section-wise BENCHMARKS.md updates.

Each benchmark writes one section, delimited by HTML comments, so sections can be
re-run independently without touching the others.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery table below was written by `python -m benchmarks.run`; each section names the\nexact command that produced it, the machine and the date.\n"


def machine() -> str:
    """CPU model, threads, torch version, date."""
    cpu, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    # the same model name has come with and without AVX-512, which doubles the fp32 peak
    simd = next((f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags), None)
    cpu += f" ({simd.upper()})" if simd else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) section ``name`` of BENCHMARKS.md."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    command = "python -m benchmarks.run " + name
    block = (f"<!-- section:{name} -->\n## {title}\n\nCommand: `{command}`  \n"
             f"Machine: {machine()}\n\n{body.strip()}\n<!-- end:{name} -->")
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    print(block, file=sys.stderr)

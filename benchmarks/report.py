"""Assemble ``BENCHMARKS.md`` at the repository root from an intro and every ``benchmarks/results/*.md`` section.

Sections come in a fixed order (speed and memory first, then the quality benchmarks), then any other section
file in alphabetical order. A speed section that was never produced is listed with the command that makes it.
Image links of a section (relative to ``benchmarks/results/``) are rewritten relative to the repository root.

``python benchmarks/report.py`` (optionally ``--results DIR --output FILE``). Importing this module has no side
effects.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
OUTPUT = REPO_ROOT / "BENCHMARKS.md"

SPEED_SECTIONS: tuple[str, ...] = ("bench_step", "bench_parts", "bench_scaling", "bench_gpu")
QUALITY_SECTIONS: tuple[str, ...] = ("regression", "ablation", "ablation_1536", "ablation_search", "scenes")
ORDER: tuple[str, ...] = SPEED_SECTIONS + QUALITY_SECTIONS
# A markdown link or image whose target is a bare relative file name (no scheme, no folder, no anchor).
_LOCAL_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)/:#\s]+)(\))")

INTRO = """# Benchmarks

Speed, memory and quality measurements of `cribo`, produced by the scripts in [`benchmarks/`](benchmarks/README.md)
and assembled by `python benchmarks/report.py`. Every section states the command that produced it, the machine
(CPU, cores, torch version, threads), the date and the load average at the time; re-run a script to refresh its
section.

The CPU speed and memory sections compare against the authors' implementation (ICLR 2024 code, unmodified,
imported from a scratch folder outside the project by `../shared/refharness`), timed in the same run as ours,
interleaved round by round, each side in its own fresh process with the same threads: every ratio is *authors /
ours* from the same round (higher is better for us), with the spread over rounds. Figures quoted from
`reference/README.md` (another run, another day; these machines vary by up to 3x between days) appear only in
columns labelled as quoted. Timings taken while the machine was busy (load average above 1.5 on 2 cores) are
flagged in their section and are inflated.
"""


def localise_links(text: str, prefix: str) -> str:
    """Prefix bare relative link targets (``plot.png``) with ``prefix`` (``benchmarks/results/``)."""
    return _LOCAL_LINK.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}{m.group(3)}", text)


def section_files(results: Path) -> list[Path]:
    """The section files to include: ORDER first, then the rest alphabetically."""
    present = {p.stem: p for p in sorted(results.glob("*.md"))} if results.is_dir() else {}
    ordered = [present[name] for name in ORDER if name in present]
    return ordered + [path for name, path in present.items() if name not in ORDER]


def assemble(results: Path = RESULTS_DIR, output: Path = OUTPUT) -> Path:
    """Write ``output`` from the intro, a table of contents and the sections; returns its path."""
    files = section_files(results)
    try:
        prefix = results.resolve().relative_to(output.resolve().parent).as_posix() + "/"
    except ValueError:
        prefix = results.resolve().as_posix() + "/"
    sections, contents = [], []
    for path in files:
        text = localise_links(path.read_text().strip(), prefix)
        title = next((line[3:].strip() for line in text.splitlines() if line.startswith("## ")), path.stem)
        contents.append(f"- [{title}](#{anchor(title)}) — `{path.name}`")
        sections.append(text)
    missing = [name for name in SPEED_SECTIONS if not (results / f"{name}.md").is_file()]
    parts = [INTRO.strip(), "## Contents", "\n".join(contents) or "(no section yet)"]
    if missing:
        parts.append("Not produced yet: " + ", ".join(f"`python benchmarks/{name}.py`" for name in missing) + ".")
    parts += sections
    output.write_text("\n\n".join(parts) + "\n")
    return output


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of section files")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the assembled file (default BENCHMARKS.md)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    path = assemble(args.results, args.output)
    print(f"wrote {path} ({len(section_files(args.results))} sections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

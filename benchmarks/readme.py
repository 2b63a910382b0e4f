"""Generate the result regions of ``benchmarks/README.md`` from ``benchmarks/results/*.md``, or check them.

    python benchmarks/readme.py            # rewrite the regions in place
    python benchmarks/readme.py --check    # exit 1 (and show a short diff) when the README is stale

A region is a pair of HTML comments around text that is generated, never edited by hand::

    <!-- results: speed_cpu.md -->
    (the content of benchmarks/results/speed_cpu.md)
    <!-- /results -->

The file is named relative to the results folder. Its content is copied verbatim except for two things:
relative link targets (``![plot](speed_cpu.png)``) are rebased from the results folder to the README's folder,
and ``shift=N`` in the opening marker (``<!-- results: paper.md shift=1 -->``) moves every Markdown heading N
levels down so the file's headings nest under the README's. Benchmark scripts call :func:`refresh` after they
write a results file. Exit status: 0 in sync (or rewritten), 1 stale (``--check``), 2 a malformed marker or a
missing results file.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"

OPEN = re.compile(r"^<!-- results:(?P<args>.*?)-->\s*$")
CLOSE = re.compile(r"^<!-- /results -->\s*$")
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
HEADING = re.compile(r"^(#{1,6})(?=\s)")
DIFF_LINES = 20


class ReadmeError(Exception):
    """A malformed marker, or a marker naming a results file that does not exist."""


@dataclass(frozen=True)
class Region:
    """One generated region: ``body`` is the text between line ``start`` (opening marker) and ``end`` (closing)."""

    name: str
    shift: int
    start: int
    end: int
    body: str


def parse_marker(args: str, line_no: int) -> tuple[str, int]:
    """``"speed_cpu.md shift=1"`` -> ``("speed_cpu.md", 1)``."""
    words = args.split()
    if not words:
        raise ReadmeError(f"line {line_no}: results marker names no file")
    shift = 0
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key != "shift" or not value.isdigit():
            raise ReadmeError(f"line {line_no}: unknown marker option {word!r} (only shift=N)")
        shift = int(value)
    return words[0], shift


def find_regions(lines: list[str]) -> list[Region]:
    """The regions of a README split into lines, in order; unpaired or nested markers are errors."""
    regions, opened = [], None
    for i, line in enumerate(lines):
        if match := OPEN.match(line):
            if opened is not None:
                raise ReadmeError(f"line {i + 1}: results marker inside the region opened on line {opened[0] + 1}")
            opened = (i, *parse_marker(match["args"], i + 1))
        elif CLOSE.match(line):
            if opened is None:
                raise ReadmeError(f"line {i + 1}: <!-- /results --> without an opening marker")
            start, name, shift = opened
            regions.append(Region(name, shift, start, i, "\n".join(lines[start + 1 : i])))
            opened = None
    if opened is not None:
        raise ReadmeError(f"line {opened[0] + 1}: results marker for {opened[1]} is never closed")
    return regions


def rebase_links(text: str, results: Path, readme_dir: Path) -> str:
    """Rewrite relative Markdown link targets so they resolve from ``readme_dir`` instead of ``results``."""
    offset = Path(os.path.relpath(results.resolve(), readme_dir.resolve()))

    def rebase(match: re.Match[str]) -> str:
        target = match[2]
        if "://" in target or target.startswith(("/", "#", "mailto:")):
            return match[0]
        return f"{match[1]}{(offset / target).as_posix()}{match[3]}"

    return LINK.sub(rebase, text)


def shift_headings(text: str, shift: int) -> str:
    """Move every Markdown heading ``shift`` levels down (at most to level 6)."""
    if not shift:
        return text
    lines = text.split("\n")
    return "\n".join(HEADING.sub(lambda m: "#" * min(6, len(m[1]) + shift), line) for line in lines)


def expected_body(region: Region, results: Path, readme_dir: Path) -> str:
    """What belongs between the markers of ``region``: the results file, framed by blank lines."""
    path = results / region.name
    if not path.is_file():
        raise ReadmeError(f"results file {path} (named by a marker in the README) does not exist")
    content = path.read_text().strip("\n")
    content = shift_headings(rebase_links(content, results, readme_dir), region.shift)
    return f"\n{content}\n"


def render(text: str, results: Path, readme_dir: Path) -> tuple[str, list[tuple[Region, str]]]:
    """The README text with every region regenerated, and the stale regions with their expected bodies."""
    lines = text.split("\n")
    out, stale, done = [], [], 0
    for region in find_regions(lines):
        body = expected_body(region, results, readme_dir)
        if body != region.body:
            stale.append((region, body))
        out += lines[done : region.start + 1] + body.split("\n")
        done = region.end
    out += lines[done:]
    return "\n".join(out), stale


def short_diff(region: Region, expected: str) -> str:
    """A unified diff of one stale region, cut to ``DIFF_LINES`` lines."""
    diff = list(
        difflib.unified_diff(
            region.body.split("\n"),
            expected.split("\n"),
            f"README (line {region.start + 1})",
            f"results/{region.name}",
            lineterm="",
        )
    )
    more = [f"... {len(diff) - DIFF_LINES} more diff lines"] if len(diff) > DIFF_LINES else []
    return "\n".join(diff[:DIFF_LINES] + more)


def check(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """One report (name and short diff) per region of ``readme`` that differs from its results file."""
    _, stale = render(readme.read_text(), results, readme.parent)
    return [f"stale region: {region.name}\n{short_diff(region, body)}" for region, body in stale]


def refresh(readme: Path = README, results: Path = RESULTS) -> bool:
    """Rewrite the regions of ``readme`` from ``results``; True when the file changed."""
    text = readme.read_text()
    new, _ = render(text, results, readme.parent)
    if new == text:
        return False
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a region is stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        if args.check:
            reports = check(args.readme, args.results)
            for report in reports:
                print(report)
            if reports:
                print(f"{args.readme} is stale: run python benchmarks/readme.py", file=sys.stderr)
            return 1 if reports else 0
        if refresh(args.readme, args.results):
            print(f"rewrote {args.readme}", file=sys.stderr)
        return 0
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

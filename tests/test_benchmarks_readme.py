"""benchmarks/README.md: its result regions equal benchmarks/results/*.md, and benchmarks/readme.py keeps them so."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_readme_module():
    spec = importlib.util.spec_from_file_location("benchmarks_readme", BENCHMARKS / "readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


readme = load_readme_module()

TABLE = "| a | b |\n|---|---|\n| 1 | 2 |\n"


def make_tree(tmp_path: Path) -> Path:
    """A tiny README with one region plus prose, and its results file; returns the README path."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text(f"## t\n\n{TABLE}\n![plot](t.png)\n")
    path = tmp_path / "README.md"
    path.write_text("# Title\n\nProse stays.\n\n<!-- results: t.md shift=1 -->\n<!-- /results -->\n\nMore prose.\n")
    return path


def test_real_readme_is_in_sync_with_results() -> None:
    assert readme.check() == [], "benchmarks/README.md is stale: run python benchmarks/readme.py"
    assert readme.main(["--check"]) == 0


def test_generate_then_hand_edit_fails_check_and_regeneration_fixes_it(tmp_path: Path) -> None:
    path = make_tree(tmp_path)
    results = tmp_path / "results"
    assert readme.check(path, results) != []  # the empty region is stale
    assert readme.refresh(path, results)
    text = path.read_text()
    assert "### t\n\n" + TABLE in text  # heading shifted one level down
    assert "![plot](results/t.png)" in text  # link rebased to the README's folder
    assert text.startswith("# Title\n\nProse stays.\n") and text.endswith("\n\nMore prose.\n")
    assert readme.check(path, results) == []
    assert not readme.refresh(path, results)  # idempotent

    path.write_text(text.replace("| 1 | 2 |", "| 1 | 3 |"))  # a hand edit inside the region
    reports = readme.check(path, results)
    assert len(reports) == 1 and "t.md" in reports[0]
    assert "-| 1 | 3 |" in reports[0] and "+| 1 | 2 |" in reports[0]
    assert readme.main(["--check", "--readme", str(path), "--results", str(results)]) == 1
    assert readme.main(["--readme", str(path), "--results", str(results)]) == 0
    assert path.read_text() == text


def test_missing_results_file_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_tree(tmp_path)
    path.write_text(path.read_text().replace("t.md", "gone.md"))
    with pytest.raises(readme.ReadmeError, match="gone.md"):
        readme.check(path, tmp_path / "results")
    assert readme.main(["--check", "--readme", str(path), "--results", str(tmp_path / "results")]) == 2
    assert "gone.md" in capsys.readouterr().err


@pytest.mark.parametrize(
    "markers",
    ["<!-- results: t.md -->\n", "<!-- /results -->\n", "<!-- results: t.md -->\n<!-- results: t.md -->\n"],
)
def test_unpaired_markers_are_errors(tmp_path: Path, markers: str) -> None:
    path = make_tree(tmp_path)
    path.write_text(markers)
    with pytest.raises(readme.ReadmeError):
        readme.check(path, tmp_path / "results")

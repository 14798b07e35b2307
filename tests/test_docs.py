"""The README tells the truth about the results files: every results file it names exists, and the
B0 table in it is the one scripts/bench_b0_digits.py wrote (results/b0_digits.md), line for line."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_readme_b0_table_is_the_results_files():
    results = _table((ROOT / "results" / "b0_digits.md").read_text())
    assert len(results) >= 4, "results/b0_digits.md has no table"
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(results) in readme, "the README's B0 table differs from results/b0_digits.md"


def test_every_results_file_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(results/[^`*<>\s]+)`", readme))
    assert named, "the README names no results file"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README names results files that do not exist: {missing}"

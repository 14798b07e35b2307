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


def test_generated_indexes_are_what_their_command_writes(tmp_path):
    """A results folder's README.md that says it was generated is exactly what its recorded command writes
    from the folder's JSON files (a hand edit, or a results file added or changed since, fails)."""
    import shlex
    import shutil

    from dfkd.bench import main

    indexes = [p for p in (ROOT / "results").glob("*/README.md") if "Generated from the results files" in p.read_text()]
    assert indexes, "no generated results index found"
    for readme in indexes:
        text = readme.read_text()
        cmd = shlex.split(re.search(r"by `([^`]+)`\. Each file", text).group(1))
        assert cmd[:4] == ["python", "-m", "dfkd.bench", "index"], cmd
        copy = tmp_path / readme.parent.name
        copy.mkdir()
        for j in readme.parent.glob("*.json"):
            shutil.copy(j, copy / j.name)
        rel = readme.parent.relative_to(ROOT).as_posix()
        assert cmd[4] == rel, f"{readme}: the command indexes {cmd[4]}, not its own folder"
        assert main(["index", str(copy), *cmd[5:]]) == 0
        regenerated = (copy / "README.md").read_text().replace(str(copy), rel)
        assert regenerated == text, f"{readme} differs from what its command generates"


def test_b4_results_tables_render_from_their_json():
    """Every B4 results file in the current script's format is its JSON rendered by the code the script uses
    (dfkd.detection.bench.b4_markdown): a hand-edited table or header fails."""
    import json

    from dfkd.detection.bench import b4_markdown

    checked = 0
    for j in sorted((ROOT / "results").glob("b4_detection_*.json")):
        result = json.loads(j.read_text())
        if "steps" not in result["settings"]:  # written by an earlier version of the script
            continue
        png = j.with_name(f"{j.stem}_time_to_map.png")
        text = "\n".join(b4_markdown(result, 0.8, png.name if png.exists() else None)) + "\n"
        assert text == j.with_suffix(".md").read_text(), f"{j.with_suffix('.md').name} differs from its JSON"
        checked += 1
    assert checked >= 2
    from dfkd.detection.bench import b4_real_markdown

    checked = 0
    for j in sorted((ROOT / "results").glob("b4_real_*.json")):
        result = json.loads(j.read_text())
        if "untrained_student" not in result:  # written by an earlier version of the script
            continue
        text = "\n".join(b4_real_markdown(result)) + "\n"
        assert text == j.with_suffix(".md").read_text(), f"{j.with_suffix('.md').name} differs from its JSON"
        checked += 1
    assert checked >= 1


def test_b4_real_summary_names_the_best_data_free_row():
    """With more than one data-free row, the summary line quotes the best of them by name, and a floor
    or ceiling row never counts as data-free."""
    import copy
    import json

    from dfkd.detection.bench import b4_real_markdown

    result = json.loads((ROOT / "results" / "b4_real_cpu_slim_w0.22.json").read_text())
    one = "\n".join(b4_real_markdown(result))
    assert "Data-free mAP@.5 is 0.05 of the ceiling's (0.0049 vs 0.1080)" in one
    more = copy.deepcopy(result)
    extra = dict(copy.deepcopy(more["rows"][1]), method="box_procedural", kind="data-free (dead-leaves images)",
                 map50=0.02, ratio_to_ceiling_map50=0.02 / 0.10802067630275028)
    more["rows"].insert(2, extra)
    more["rows"][0]["kind"] = "floor (not data-free)"
    more["rows"][0]["map50"] = 0.5  # a strong floor must not be quoted as data-free
    text = "\n".join(b4_real_markdown(more))
    assert "The best data-free mAP@.5 (box_procedural) is 0.19 of the ceiling's (0.0200 vs 0.1080)" in text


def test_no_results_file_or_readme_names_a_folder_of_the_machine_that_wrote_it():
    """Results files and the README name folders by their option or placeholder ($DFKD_DATA, $WORK, $OUT,
    ~), never by an absolute path of the machine a benchmark ran on."""
    import subprocess

    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "results", "README.md"], capture_output=True,
                             text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): look at what is there
        tracked = [str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*") if p.is_file()] + ["README.md"]
    pattern = re.compile(r"(?:^|[\s`'\"=(:,\[])(/(?:home|work|tmp|root|Users|mnt|scratch|private|var/folders)/[^\s`'\",)\]]*)")
    found = {}
    for rel in tracked:
        p = ROOT / rel
        if p.suffix not in (".md", ".json", ".txt", ".csv", ".yaml") or not p.is_file():
            continue
        hits = pattern.findall(p.read_text(errors="replace"))
        if hits:
            found[rel] = sorted(set(hits))[:3]
    assert not found, f"absolute paths of a machine in results/README: {found}"

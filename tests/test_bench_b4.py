"""scripts/bench_b4_detection.py end to end at a tiny size: results files, per-seed ratios, teacher cache.

Tiny digits canvases, a teacher trained for a few steps, a few seconds per student; the numbers
mean nothing, the plumbing is what is checked.
"""

import json

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_b4_detection")


def test_b4_tiny_run_writes_side_by_side_results(bench, tmp_path, capsys):
    args = ["--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--name", "b4_tiny",
            "--seeds", "0", "1", "--train-canvases", "24", "--test-canvases", "8", "--teacher-steps", "4",
            "--teacher-batch", "8", "--budget-minutes", "0.02", "--kd-batch", "4", "--source-batch", "4",
            "--inv-batch", "4", "--inv-iterations", "2", "--inv-kd-steps-per-round", "2", "--memory-size", "16",
            "--eval-images", "4", "--eval-every-seconds", "0.2", "--inv-adi", "0.5"]
    bench.main(args)
    out = tmp_path / "out"
    res = json.loads((out / "b4_tiny.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["box_noise", "box_inversion", "real"]
    assert {(r["method"], r["seed"]) for r in res["runs"]} == {(m, s) for m in bench.METHODS for s in (0, 1)}
    for r in res["runs"]:
        assert 0.0 <= r["map50"] <= 1.0 and r["steps"] > 0 and r["time_to_map"]
    inv = next(r for r in res["rows"] if r["method"] == "box_inversion")
    real = next(r for r in res["rows"] if r["method"] == "real")
    assert len(inv["map50_per_seed"]) == 2
    per_seed = res["ratio_to_ceiling_map50_per_seed"]
    for seed in ("0", "1"):
        runs = {r["method"]: r for r in res["runs"] if r["seed"] == int(seed)}
        if runs["real"]["map50"] > 0:
            assert per_seed[seed] == pytest.approx(runs["box_inversion"]["map50"] / runs["real"]["map50"])
    if real["map50"] > 0:
        assert inv["ratio_to_ceiling_map50"] == pytest.approx(inv["map50"] / real["map50"])
        assert res["target_met"] == (inv["ratio_to_ceiling_map50"] >= bench.TARGET)
    assert res["inversion"]["adi"] == 0.5 and res["weak_teacher"] is True  # four steps train no detector
    md = (out / "b4_tiny.md").read_text()
    assert "| box_inversion | data-free |" in md and "Warning:" in md and "ADI competition" in md
    assert str(tmp_path) not in md and str(tmp_path) not in json.dumps(res)
    # the second run finds the teacher in the work folder
    bench.main(args[:-2] + ["--methods", "real", "--seeds", "0", "--name", "b4_tiny2"])
    res2 = json.loads((out / "b4_tiny2.json").read_text())
    assert res2["teacher"]["cached"] and res2["teacher"]["map50"] == res["teacher"]["map50"]
    assert res2["target_met"] is None and "not evaluated" in (out / "b4_tiny2.md").read_text()

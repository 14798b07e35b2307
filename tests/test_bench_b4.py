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


# Every final mAP of a run this small is 0, which would leave the table's arithmetic (ratios to the
# real-data ceiling, per seed and on the mean, the target verdicts) untested: the final full-test-set
# scores of the students are replaced by these, in the script's run order (methods x seeds). The
# teacher's score, and every score taken along the way, are the real ones.
FINAL_MAP50 = {("box_noise", 0): 0.10, ("box_noise", 1): 0.12, ("box_inversion", 0): 0.30,
               ("box_inversion", 1): 0.36, ("real", 0): 0.40, ("real", 1): 0.40}


@pytest.fixture
def final_scores(monkeypatch):
    """Patches the evaluator the script imports: the first full-set call of a run scores the teacher
    (left as it is), the following ones the students in order, given ``FINAL_MAP50``'s values."""
    import dfkd.eval.detection as ev

    real = ev.evaluate_detector
    state = {"order": [], "full_calls": 0}

    def evaluate(*a, **k):
        r = real(*a, **k)
        if k.get("max_images") is None:
            state["full_calls"] += 1
            if state["full_calls"] > 1 and state["order"]:
                v = FINAL_MAP50[state["order"].pop(0)]
                r = {**r, "map50": v, "map": v / 2}
        return r

    monkeypatch.setattr(ev, "evaluate_detector", evaluate)
    return state


def test_b4_tiny_run_writes_side_by_side_results(bench, tmp_path, final_scores):
    args = ["--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--name", "b4_tiny",
            "--seeds", "0", "1", "--train-canvases", "24", "--test-canvases", "8", "--teacher-steps", "4",
            "--teacher-batch", "8", "--budget-minutes", "0.02", "--kd-batch", "4", "--source-batch", "4",
            "--inv-batch", "4", "--inv-iterations", "2", "--inv-kd-steps-per-round", "2", "--memory-size", "16",
            "--eval-images", "4", "--eval-every-seconds", "0.2", "--inv-adi", "0.5"]
    final_scores["order"] = [(m, s) for m in bench.METHODS for s in (0, 1)]
    bench.main(args)
    assert final_scores["order"] == [] and final_scores["full_calls"] == 7  # the teacher, then six students
    out = tmp_path / "out"
    res = json.loads((out / "b4_tiny.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["box_noise", "box_inversion", "real"]
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [(m, s) for m in bench.METHODS for s in (0, 1)]
    for r in res["runs"]:
        want = FINAL_MAP50[(r["method"], r["seed"])]
        assert r["map50"] == want and r["map"] == want / 2 and r["steps"] > 0
        # the curve ends with the final score, at the run's last step
        assert r["time_to_map"][-1][1:] == [r["steps"], want / 2, want]
    rows = {r["method"]: r for r in res["rows"]}
    inv, real = rows["box_inversion"], rows["real"]
    assert inv["map50_per_seed"] == [0.30, 0.36] and inv["map50"] == pytest.approx(0.33)
    assert inv["map50_std"] == pytest.approx(0.03) and real["map50"] == pytest.approx(0.40)
    # mean over seeds against the mean ceiling: 0.33 / 0.40 = 82.5 % (met); per seed: 75 % and 90 %
    assert inv["ratio_to_ceiling_map50"] == pytest.approx(0.825)
    assert rows["box_noise"]["ratio_to_ceiling_map50"] == pytest.approx(0.11 / 0.40)
    assert real["ratio_to_ceiling_map50"] == pytest.approx(1.0)
    assert res["ratio_to_ceiling_map50_per_seed"] == pytest.approx({"0": 0.75, "1": 0.90})
    assert res["target_met"] is True and res["target_met_every_seed"] is False
    assert res["inversion"]["adi"] == 0.5 and res["weak_teacher"] is True  # four steps train no detector
    md = (out / "b4_tiny.md").read_text()
    assert "| box_inversion | data-free | 0.1650 | 0.3300 ± 0.0300 | 82.5% |" in md, md
    assert "**met** — box_inversion reaches 82.5% of the ceiling (mean mAP@.5 over 2 seeds)" in md
    assert "seed 0: 75.0%, seed 1: 90.0% — target missed on some seed" in md
    assert "Warning:" in md and "ADI competition" in md
    assert str(tmp_path) not in md and str(tmp_path) not in json.dumps(res)
    # the second run finds the teacher in the work folder and does not train it again
    teachers = list((tmp_path / "work").glob("teacher_*.safetensors"))
    assert len(teachers) == 1 and not res["teacher"]["cached"]
    stamp = teachers[0].stat().st_mtime_ns
    bench.main(args[:-2] + ["--methods", "real", "--seeds", "0", "--name", "b4_tiny2"])
    res2 = json.loads((out / "b4_tiny2.json").read_text())
    assert res2["teacher"]["cached"] and res2["teacher"]["train_seconds"] == 0.0
    assert res2["teacher"]["map50"] == res["teacher"]["map50"]
    assert list((tmp_path / "work").glob("teacher_*.safetensors")) == teachers and teachers[0].stat().st_mtime_ns == stamp
    assert res2["target_met"] is None and "not evaluated" in (out / "b4_tiny2.md").read_text()

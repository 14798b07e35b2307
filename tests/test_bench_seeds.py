"""Benchmark drivers: a method can have its own seeds (the floor and the ceiling at one seed beside a
three-seed headline), and the table says how many seeds each row has."""

from __future__ import annotations

import pytest

import dfkd.bench as bench
import dfkd.pipeline as pipeline


@pytest.fixture
def fake_distill(monkeypatch):
    calls = []

    def run_distill(cfg, run_dir):
        calls.append((cfg.synthesizer.name, cfg.seed))
        return {"student_top1": 0.1 * cfg.seed + 0.05, "distill_seconds": 1.0, "seed": cfg.seed,
                "synth_images_per_second": None}

    monkeypatch.setattr(pipeline, "run_distill", run_distill)
    return calls


def test_seeds_for_gives_a_method_its_own_seeds(fake_distill, tmp_path):
    rows = bench.run_methods(["noise", "fast_meta"], ["data=digits"], {}, [0, 1, 2], tmp_path,
                             seeds_for={"noise": [0]})
    assert fake_distill == [("noise", 0), ("fast_meta", 0), ("fast_meta", 1), ("fast_meta", 2)]
    table = {r["method"]: r for r in bench.aggregate(rows)}
    assert table["noise"]["student_top1_per_seed"] == [pytest.approx(0.05)]
    assert table["noise"]["student_top1_std"] is None
    assert table["fast_meta"]["student_top1_per_seed"] == pytest.approx([0.05, 0.15, 0.25])
    assert table["fast_meta"]["student_top1_std"] is not None


def test_without_seeds_for_every_method_runs_every_seed(fake_distill, tmp_path):
    bench.run_methods(["noise", "fast_meta"], ["data=digits"], {}, [3, 4], tmp_path)
    assert fake_distill == [("noise", 3), ("noise", 4), ("fast_meta", 3), ("fast_meta", 4)]


def _store(run_dir, overrides, top1=0.5):
    import json

    from dfkd.pipeline import _plain

    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(_plain(bench.compose("distill", overrides))))
    (run_dir / "summary.json").write_text(json.dumps({"student_top1": top1}))


def test_stored_run_is_taken_only_with_the_same_settings(tmp_path):
    want = ["data=digits", "synthesizer=fast_meta", "seed=1"]
    _store(tmp_path / "a", want)
    got = bench.stored_run(tmp_path / "a", want)
    assert got["student_top1"] == 0.5 and got["reused"] is True and got["run_dir"] == str(tmp_path / "a")
    assert bench.stored_run(tmp_path / "a", ["data=digits", "synthesizer=fast_meta", "seed=2"]) is None
    assert bench.stored_run(tmp_path / "a", ["data=digits", "synthesizer=adversarial", "seed=1"]) is None
    assert bench.stored_run(tmp_path / "a", [*want, "synthesizer.lr=0.5"]) is None
    assert bench.stored_run(tmp_path / "missing", want) is None
    # an unfinished run (no summary yet) is not taken
    (tmp_path / "a" / "summary.json").unlink()
    assert bench.stored_run(tmp_path / "a", want) is None


def test_a_stored_run_from_before_a_new_setting_still_counts(tmp_path):
    import json

    want = ["data=digits", "synthesizer=fast_meta"]
    _store(tmp_path / "a", want)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["student"]["init"]  # written before student.init existed
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert bench.stored_run(tmp_path / "a", want) is not None
    assert bench.stored_run(tmp_path / "a", [*want, "student.init=teacher"]) is None


def test_a_stored_run_from_before_distill_ema_counts_only_with_the_average_off(tmp_path):
    import json

    want = ["data=digits", "synthesizer=fast_meta"]
    _store(tmp_path / "a", want)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["distill"]["ema"]  # written before distill.ema existed
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert bench.stored_run(tmp_path / "a", want) is not None
    assert bench.stored_run(tmp_path / "a", [*want, "distill.ema=0.99"]) is None


def test_a_stored_run_from_before_a_synthesizer_setting_counts_only_at_its_default(tmp_path):
    """procedural.saturation arrived after runs were stored: a stored run without the key reproduces the
    default (1.0), not another value."""
    import json

    want = ["data=digits", "synthesizer=procedural", "synthesizer.saturation=1.0"]
    _store(tmp_path / "a", want)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["synthesizer"]["saturation"]  # written before the setting existed
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert bench.stored_run(tmp_path / "a", want) is not None
    assert bench.stored_run(tmp_path / "a", ["data=digits", "synthesizer=procedural",
                                              "synthesizer.saturation=0.5"]) is None


def test_seeds_for_rejects_bad_items():
    assert bench.parse_seeds_for(["noise=0", "real=1,2"], ["noise", "real"], "b") == {"noise": [0], "real": [1, 2]}
    with pytest.raises(SystemExit, match="b: error: --seeds-for wants"):
        bench.parse_seeds_for(["noise=x"], ["noise"], "b")
    with pytest.raises(SystemExit, match="not among the rows"):
        bench.parse_seeds_for(["other=0"], ["noise"], "b")

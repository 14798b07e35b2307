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

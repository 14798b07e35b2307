"""Command-line behaviour outside the main flows: bad synthesizer paths found before the teacher is
built, and the CI rule that a data test may not skip when the shared data is there."""

import os

import pytest

from dfkd.errors import DfkdError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_teacher(monkeypatch):
    """Building the teacher (on a cold cache: training it, ~25 s) fails the test."""
    import dfkd.pipeline

    def refuse(*a, **k):
        raise AssertionError("the teacher was built before the bad setting was reported")

    monkeypatch.setattr(dfkd.pipeline, "build_teacher", refuse)


BAD_PATHS = [("diffusion", "synthesizer.path=null", "needs synthesizer.path"),
             ("diffusion", "synthesizer.path=/nonexistent/ddpm", "not found"),
             ("stored", "synthesizer.path=null", "needs synthesizer.path")]


@pytest.mark.parametrize("name,override,needle", BAD_PATHS[:2])
def test_synthesize_reports_a_bad_synthesizer_path_before_the_teacher(no_teacher, name, override, needle, tmp_path):
    from dfkd.bench import compose
    from dfkd.cli.synthesize import run_synthesize

    cfg = compose("synthesize", [f"synthesizer={name}", override, f"output={tmp_path / 'ds'}", "device=cpu",
                                 "progress=false", "threads=1"])
    with pytest.raises(DfkdError, match=needle):
        run_synthesize(cfg)
    assert not (tmp_path / "ds").exists()


def test_the_synthesizers_check_their_paths_cheaply(tmp_path):
    from generators import SYNTHESIZERS

    for name, override, needle in BAD_PATHS:
        path = override.split("=", 1)[1]
        with pytest.raises(DfkdError, match=needle):
            SYNTHESIZERS.get(name).check_settings({"path": None if path == "null" else path})
    with pytest.raises(DfkdError, match="needs synthesizer.path"):  # an unfilled ??? from the config
        SYNTHESIZERS.get("diffusion").check_settings({"path": "???"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="no manifest.json"):
        SYNTHESIZERS.get("stored").check_settings({"path": str(tmp_path / "empty")})


@pytest.mark.parametrize("name,override,needle", [BAD_PATHS[0], BAD_PATHS[2]])
def test_distill_reports_a_missing_synthesizer_path_before_the_teacher(no_teacher, name, override, needle, tmp_path):
    from dfkd.bench import compose
    from dfkd.pipeline import run_distill

    cfg = compose("distill", [f"synthesizer={name}", override, "device=cpu", "progress=false", "threads=1"])
    with pytest.raises(DfkdError, match=needle):
        run_distill(cfg, tmp_path / "run")


def _pytest(*args, **env):
    """``python -m pytest ARGS`` in a process of its own (forked from the command server: torch is
    already imported), with this environment less the data variables, plus ``env``."""
    from conftest import run_forked

    full = {k: v for k, v in os.environ.items() if k not in ("DFKD_DATA", "DFKD_REQUIRE_DATA")}
    full.update(env)
    return run_forked("pytest", "-p", "no:cacheprovider", *args, env=full, inherit_env=False, timeout=120)


def test_a_data_test_that_skips_fails_when_the_data_is_required(tmp_path):
    target = "tests/test_cifar_teachers.py"  # skips unless DFKD_DATA holds the CIFAR-10 teachers
    quiet = _pytest(target, DFKD_DATA=str(tmp_path))
    assert quiet.returncode == 0, quiet.stdout[-2000:]
    assert "SKIPPED [2]" in quiet.stdout and "set DFKD_DATA" in quiet.stdout  # -rs lists the skips
    strict = _pytest(target, DFKD_DATA=str(tmp_path), DFKD_REQUIRE_DATA="1")
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert strict.stdout.count("DFKD_REQUIRE_DATA=1 but this data test skipped") == 2, strict.stdout[-2000:]


@pytest.mark.parametrize("config", ["distill", "synthesize"])
@pytest.mark.parametrize("teacher", ["timm", "torchvision", "checkpoint", "module"])
def test_a_users_teacher_defaults_to_no_data(config, teacher):
    """The built-in digits are not scored against a teacher of the user's own (a CIFAR or ImageNet teacher
    with named classes made every default command fail on the digits' class names); a dataset named on
    the command line still wins, and the built-in teacher keeps the digits."""
    from dfkd.bench import compose

    base = [f"teacher={teacher}"] + (["teacher._target_=m:build"] if teacher == "module" else ["teacher.checkpoint=x"])
    assert compose(config, base).data.name == "none"
    assert compose(config, [*base, "data=cifar10"]).data.name == "cifar10"
    assert compose(config, []).data.name == "digits"

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``scripts/<name>.py`` as a module, to call its ``main(argv)`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_data() -> Path | None:
    """The real-data folder (CIFAR-10 .npz, pretrained teachers), from DFKD_DATA."""
    p = os.environ.get("DFKD_DATA")
    return Path(p) if p and Path(p).is_dir() else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``DFKD_REQUIRE_DATA=1`` (``.ci/run`` sets it when the shared data is present), a test
    that skips for want of the shared data (its reason names DFKD_DATA) fails instead: a CI run
    that silently lost its real-data tests would otherwise pass."""
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and os.environ.get("DFKD_REQUIRE_DATA") == "1") or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if "DFKD_DATA" in reason:
        rep.outcome = "failed"
        rep.longrepr = (f"DFKD_REQUIRE_DATA=1 but this data test skipped ({reason}); "
                        f"DFKD_DATA={os.environ.get('DFKD_DATA')!r}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (tiny models gain nothing from threads, and oversubscribed
    intra-op threads stall on a busy machine); the previous count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dfkd_cache")
    os.environ["DFKD_CACHE"] = str(d)
    return d


@pytest.fixture
def bn_teacher():
    """A tiny BatchNorm CNN teacher on 8×8 RGB images with non-trivial running statistics."""
    from dfkd.models import build_model
    from dfkd.teacher import Teacher

    torch.manual_seed(0)
    m = build_model("small_cnn", num_classes=4, in_chans=3, width=8)
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(32, 3, 8, 8) * 0.5 + 0.2)
        m.head.weight.mul_(10.0)  # confident logits, as a trained teacher has
    return Teacher(m, [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)


@pytest.fixture
def tiny_vit_student():
    from dfkd.models import build_model
    from dfkd.teacher import Normalized

    torch.manual_seed(1)
    m = build_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=3, num_classes=4,
                    embed_dim=16, depth=1, num_heads=2, global_pool="avg", class_token=False)
    return Normalized(m, [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an installed console command (through ``python -m`` so the test's interpreter is used)."""
    module = {"dfkd-distill": "dfkd.cli.distill", "dfkd-train-teacher": "dfkd.cli.train_teacher",
              "dfkd-synthesize": "dfkd.cli.synthesize", "dfkd-inspect": "dfkd.cli.inspect",
              "dfkd-train-diffusion": "dfkd.cli.train_diffusion"}[args[0]]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args[1:]], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(ROOT))

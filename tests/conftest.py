import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread for the tests' own (tiny) models. On a 2-core machine that runs anything else
# two threads stall each other: tests/test_diffusion.py + tests/test_synthesizers.py (in-process
# tests only) took 174 s and 212 s with two threads and 12.7 s and 14.5 s with one, run back to back
# next to one other busy process (load average ~2). Commands the tests start choose their own (threads=).
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def digits_teacher_cache(cache_dir) -> Path:
    """``cache_dir`` holding the built-in digits teacher that every ``teacher.train.epochs=3`` run of the
    default config uses (the cache key is the teacher's config, data and seed): trained here once, in
    this process, if no test has trained it yet. Commands given ``DFKD_CACHE`` = this folder start
    distilling at once."""
    from dfkd.bench import compose
    from dfkd.pipeline import build_teacher, load_data

    cfg = compose("distill", ["teacher.train.epochs=3", "progress=false", "device=cpu"])
    raw = load_data(cfg["data"], train=True)
    build_teacher(cfg["teacher"], raw, torch.device("cpu"), seed=int(cfg["seed"]), progress=False)
    assert len(list((cache_dir / "teachers").glob("*.safetensors"))) >= 1
    return cache_dir


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


COMMANDS = {"dfkd-distill": "dfkd.cli.distill", "dfkd-train-teacher": "dfkd.cli.train_teacher",
            "dfkd-synthesize": "dfkd.cli.synthesize", "dfkd-inspect": "dfkd.cli.inspect",
            "dfkd-train-diffusion": "dfkd.cli.train_diffusion", "dfkd-eval": "dfkd.cli.evaluate"}


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an installed console command (through ``python -m`` so the test's interpreter is used)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", COMMANDS[args[0]], *args[1:]], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(ROOT))


# One interpreter (started once per test session, on first use) imports what every command imports
# (torch, hydra, scikit-learn, the package: about 5 s of CPU a process, nearly all of what a command
# that stops at a bad input costs, and most of a tiny run's), then forks one child per command. Each
# child is a process of its own, in the state a fresh ``python -m MODULE`` reaches after those
# imports: it takes the command's environment, folder and arguments (PYTHONPATH applied to
# sys.path), runs the module as ``__main__`` (the console command's own ``main()``), a script, or
# ``python -c`` code, and exits with its status (a signal that kills it shows as ``-signal``, as with
# subprocess); its stdout and stderr (the file descriptors, so log handlers and warnings are caught
# too) come back separately. The server handles one command at a time, in the order given.
_FORK_SERVER = r"""
import importlib, json, os, runpy, signal, sys, tempfile, time, traceback
import torch, hydra, omegaconf, timm, sklearn.datasets, sklearn.model_selection  # noqa: E401,F401
import dfkd.cli.common, dfkd.pipeline, generators  # noqa: E401,F401
reply = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing but replies on the reply pipe
for line in sys.stdin:
    c = json.loads(line)
    for name in c.get("preload", ()):  # imported here once, then inherited by every later child
        importlib.import_module(name)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            reply.close()  # the reply pipe is the server's alone
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0); os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
            os.environ.clear(); os.environ.update(c["env"])
            os.chdir(c["cwd"])
            sys.path[:0] = [p for p in c["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
            try:
                if "module" in c:
                    sys.argv = [c["module"], *c["args"]]
                    runpy.run_module(c["module"], run_name="__main__", alter_sys=True)
                elif "script" in c:
                    sys.argv = [c["script"], *c["args"]]
                    runpy.run_path(c["script"], run_name="__main__")
                else:
                    sys.argv = ["-c", *c["args"]]
                    exec(compile(c["code"], "<string>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr); code = 1
            except BaseException:
                traceback.print_exc(); code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.time() + c["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status); break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); rc = "timeout"; break
        time.sleep(0.02)
    out.seek(0); err.seek(0)
    reply.write(json.dumps({"returncode": rc, "stdout": out.read().decode(errors="replace"),
                            "stderr": err.read().decode(errors="replace")}) + "\n")
    reply.flush()
    out.close(); err.close()
"""

_server: dict = {}


def _fork_server() -> subprocess.Popen:
    p = _server.get("proc")
    if p is None or p.poll() is not None:
        import atexit
        import tempfile

        log = tempfile.TemporaryFile()
        p = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=log, text=True, cwd=str(ROOT))
        _server.update(proc=p, log=log)
        atexit.register(lambda: p.stdin.close() if p.poll() is None else None)
    return p


def _forked(job: dict, timeout: int, inherit_env: bool = True) -> dict:
    import json

    p = _fork_server()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(job.get("env") or {})} if inherit_env else dict(job["env"])
    job = {**job, "env": env, "cwd": str(ROOT), "timeout": timeout}
    p.stdin.write(json.dumps(job) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        log = _server["log"]
        log.seek(0)
        raise RuntimeError(f"the command server died: {log.read().decode(errors='replace')[-3000:]}")
    return json.loads(line)


def run_forked(*args: str, env: dict | None = None, timeout: int = 300, code: str | None = None,
               script: str | os.PathLike | None = None, preload: tuple[str, ...] = (),
               inherit_env: bool = True) -> subprocess.CompletedProcess:
    """Like :func:`run_cli` (``args[0]``: a console command such as ``dfkd-distill``, or a module), in a
    process forked from the command server (see ``_FORK_SERVER``) instead of a fresh interpreter.
    With ``code=``: ``python -c code *args``; with ``script=``: ``python script *args``.
    ``preload``: modules the server imports before this fork and keeps (``diffusers``).
    ``inherit_env=False``: ``env`` is the whole environment, not additions to this process's."""
    if code is not None:
        job = {"code": code, "args": [str(a) for a in args]}
    elif script is not None:
        job = {"script": str(script), "args": [str(a) for a in args]}
    else:
        job = {"module": COMMANDS.get(args[0], args[0]), "args": [str(a) for a in args[1:]]}
    x = _forked({**job, "env": env, "preload": list(preload)}, timeout, inherit_env)
    argv = [job.get("module") or job.get("script") or "-c", *job["args"]]
    return subprocess.CompletedProcess(argv, x["returncode"], x["stdout"], x["stderr"])


def run_cli_many(calls: list[tuple], timeout: int = 300, preload: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """Several console commands, one after the other, each through :func:`run_forked`. ``calls``:
    ``(command, [args...])`` or ``(command, [args...], env)`` with ``command`` a console command
    (``dfkd-distill``) or a module (``dfkd.models.convert``); the env adds to this process's, as
    :func:`run_cli`'s does. ``returncode`` is ``"timeout"`` for a command killed after ``timeout`` s."""
    return [run_forked(command, *args, env=env, timeout=timeout, preload=preload)
            for command, args, env in ((*c, None)[:3] for c in calls)]


def kill_after_checkpoint(condition: str) -> str:
    """Code for :func:`run_forked`: run dfkd-distill and SIGKILL its own process right after a
    ``checkpoint.pt`` whose saved state ``st`` satisfies ``condition`` (a Python expression) is on disk,
    so the kill lands at the same point on every run, however fast or loaded the machine is."""
    return f"""
import io, os, signal, sys
import torch
import dfkd.models.checkpoint as ck

def write_then_die(path, data):
    write(path, data)
    if os.path.basename(str(path)) == "checkpoint.pt":
        st = torch.load(io.BytesIO(data), weights_only=True)
        if {condition}:
            os.kill(os.getpid(), signal.SIGKILL)

write = ck.atomic_write_bytes
ck.atomic_write_bytes = write_then_die
from dfkd.cli.distill import main
sys.argv = ["dfkd-distill", *sys.argv[1:]]
main()
"""

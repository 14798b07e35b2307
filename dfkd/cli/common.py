"""Shared plumbing of the Hydra command-line apps: config location, clean errors, exit codes.

Errors a user can fix (a bad override, a missing file, an unknown model) print one line on
stderr and exit with status 2. Config problems are found by composing the config once before
Hydra takes over, so they never reach Hydra's multi-line report.
"""

from __future__ import annotations

import functools
import re
import os
import sys
from pathlib import Path
from typing import Any, Callable

from dfkd.errors import DfkdError

EXIT_USAGE = 2


def config_dir() -> str:
    """The installed ``configs/`` folder (shipped as the ``dfkd_configs`` package)."""
    try:
        import dfkd_configs

        return str(Path(dfkd_configs.__file__).resolve().parent)
    except ImportError:  # running from a source checkout without installing
        return str(Path(__file__).resolve().parents[2] / "configs")


def one_line(message: str) -> str:
    parts = [p.strip() for p in str(message).replace("\t", " ").splitlines() if p.strip()]
    parts = [p for p in parts if not p.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return "; ".join(parts) if parts else "error"


def run_script(prog: str, run, *args) -> int:
    """``run(*args)``'s exit code, with a :class:`DfkdError` as one ``prog: error: ...`` line on stderr and
    exit code 2 (the benchmark scripts' ``main``); any other exception propagates."""
    from dfkd.errors import DfkdError

    try:
        return run(*args)
    except DfkdError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _chain_message(e: BaseException) -> str:
    """The messages of an exception and its causes (Hydra wraps the useful one)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = one_line(str(e))
        # OmegaConf appends "full_key: ... object_type=..." context lines: keep the message only
        msg = msg.split("; full_key:")[0].split("; Config search path")[0]
        msg = re.sub(r"(Available options in '[^']+':); ", r"\1 ", msg)
        if msg and msg not in parts and "$VALUE" not in msg:
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def _plain_overrides(args: list[str]) -> bool:
    return all(not a.startswith("-") for a in args)


def validate_overrides(config_name: str, args: list[str]) -> None:
    """Compose once with the user's overrides; raise DfkdError with Hydra's message on failure."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dfkd.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=args)
            from omegaconf import OmegaConf

            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except DfkdError:
        raise
    except Exception as e:  # hydra / omegaconf errors: bad key, bad value, bad group choice
        raise DfkdError(_chain_message(e)) from None
    finally:
        GlobalHydra.instance().clear()


_FREE_DICTS = ("teacher.kwargs.", "student.kwargs.", "detection.")


def normalize_overrides(args: list[str]) -> list[str]:
    """Make the command line mean what a user means by it:

    - ``teacher.kwargs.img_size=32`` adds the key (Hydra would need ``+``);
    - ``student.model=NAME`` without choosing a student group starts from ``student=auto`` (no keyword
      arguments): the default group's ``kwargs`` were written for another model and would otherwise
      silently apply to this one (``student.kwargs.X=...`` given as well still applies)."""
    out = []
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    if "student.model" in keys and "student" not in keys:
        out.append("student=auto")
    for a in args:
        key = a.split("=", 1)[0]
        if "=" in a and key.startswith(_FREE_DICTS) and not a.startswith(("+", "~")):
            a = "++" + a
        out.append(a)
    return out


def check_writable(path: str | os.PathLike, what: str) -> None:
    """A one-line error now rather than a traceback after the work: ``path`` (a folder to be made) must be
    creatable and writable."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DfkdError(f"{what} {p}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DfkdError(f"{what} {p} is not writable")


def _output_dirs(config_name: str, args: list[str]) -> list[tuple[str, str]]:
    """The folders a command will write, from its composed config (with Hydra's own settings)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=args, return_hydra_config=True)
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(cfg)
            out = []
            if "output" in cfg and cfg.output is not None and not OmegaConf.is_missing(cfg, "output"):
                out.append(("output", str(cfg.output)))
            out.append(("hydra.run.dir", str(cfg.hydra.run.dir)))
            return out
    except Exception:  # noqa: BLE001 - composition errors are reported by validate_overrides
        return []
    finally:
        GlobalHydra.instance().clear()


def hydra_app(prog: str, config_name: str, task: Callable[[Any], Any]) -> Callable[[], None]:
    """Build the console entry point for ``task(cfg)``."""

    def main() -> None:
        import hydra

        from dfkd.config import register_configs

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        args = sys.argv[1:]
        if _plain_overrides(args):
            args = normalize_overrides(args)
            sys.argv = [sys.argv[0], *args]
            try:
                validate_overrides(config_name, args)
                for what, path in _output_dirs(config_name, args):
                    check_writable(path, what)
            except DfkdError as e:
                fail(prog, str(e))
        register_configs()

        @functools.wraps(task)
        def guarded(cfg):
            try:
                return task(cfg)
            except DfkdError as e:
                fail(prog, str(e))
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; run the same command with the same hydra.run.dir to resume",
                      file=sys.stderr)
                sys.exit(130)

        hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(guarded)()

    return main

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


def hydra_app(prog: str, config_name: str, task: Callable[[Any], Any]) -> Callable[[], None]:
    """Build the console entry point for ``task(cfg)``."""

    def main() -> None:
        import hydra

        from dfkd.config import register_configs

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        args = sys.argv[1:]
        if _plain_overrides(args):
            try:
                validate_overrides(config_name, args)
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

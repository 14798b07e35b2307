"""``dfkd-distill``: distil a student from a teacher without the teacher's data.

    dfkd-distill                                   # built-in digits default, CPU, minutes
    dfkd-distill synthesizer=adversarial           # another synthesis method
    dfkd-distill experiment=cifar10_resnet56_resnet20 data.root=PATH
    dfkd-distill hydra.run.dir=runs/mine           # run again with the same folder to resume
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dfkd.cli.common import hydra_app


def task(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from dfkd import dist as D
    from dfkd.pipeline import format_summary, run_distill

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_distill(cfg, run_dir)
        if D.is_main():
            print(format_summary(summary, Path(summary.get("run_dir", run_dir))))
    except BaseException:
        D.cleanup(synchronize=False)
        raise
    D.cleanup()
    return summary


main = hydra_app("dfkd-distill", "distill", task)

if __name__ == "__main__":
    main()

"""``dfkd-train-diffusion``: train a class-conditional diffusion model on a stored synthetic dataset.

    dfkd-train-diffusion dataset=synthetic/digits_deepinversion output=models/digits_ddpm
    dfkd-distill synthesizer=diffusion synthesizer.path=models/digits_ddpm

Run the same command again to resume an interrupted run.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dfkd.cli.common import hydra_app


def task(cfg: DictConfig) -> dict:
    from dfkd.diffusion import train_diffusion_from_store
    from dfkd.errors import DfkdError
    from dfkd.pipeline import setup_runtime

    try:
        import diffusers  # noqa: F401  (a clear error before any work)
    except ImportError:
        raise DfkdError("dfkd-train-diffusion needs the 'diffusers' package: pip install 'dfkd[diffusion]'") from None
    device = setup_runtime(cfg)
    budget = cfg.budget_minutes
    summary = train_diffusion_from_store(
        str(cfg.dataset), str(cfg.output), label_from=str(cfg.label_from), steps=int(cfg.steps),
        batch_size=int(cfg.batch_size), lr=float(cfg.lr), warmup=int(cfg.warmup),
        widths=[int(v) for v in cfg.widths], layers_per_block=int(cfg.layers_per_block),
        attention=bool(cfg.attention), p_uncond=float(cfg.p_uncond), train_timesteps=int(cfg.train_timesteps),
        beta_schedule=str(cfg.beta_schedule), ema_decay=float(cfg.ema_decay), flip=bool(cfg.flip),
        seed=int(cfg.seed), device=device, checkpoint_every=int(cfg.checkpoint_every),
        budget_seconds=None if budget is None else float(budget) * 60, progress=bool(cfg.progress))
    state = "finished" if summary["finished"] else "stopped early (run the same command again to continue)"
    print(f"diffusion model {summary['output']}: {summary['steps_done']} steps, loss {summary['final_loss']:.4f}, "
          f"{state}, {summary['wall_seconds']:.1f} s")
    return summary


main = hydra_app("dfkd-train-diffusion", "train_diffusion", task)

if __name__ == "__main__":
    main()

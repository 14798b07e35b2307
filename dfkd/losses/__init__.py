from dfkd.losses.kd import js_divergence, kd_loss
from dfkd.losses.priors import l2_prior, tv_prior

__all__ = ["kd_loss", "js_divergence", "tv_prior", "l2_prior"]

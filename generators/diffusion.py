"""Diffusion sampling steered by the teacher (diffusers models, dfkd's own sampling loop).

A diffusion model kept in a local folder (``from_pretrained(path)``, nothing from a hub)
proposes images; the frozen teacher steers every denoising step. At step t the model's noise
estimate gives the predicted clean sample

    x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t,

the teacher's losses on the image decoded from x̂₀ (cross-entropy to the target class, its
statistics prior, optionally an adversarial term against the student) are differentiated with
respect to x̂₀ only — never through the denoiser — and x̂₀ moves against that gradient
(normalised to unit RMS per sample, scaled by ``guidance · √(1−ᾱ_t)`` so guidance is strong
early and fades as the sample settles). The step's noise estimate is recomputed from the moved
x̂₀ and handed to the scheduler (DDIM, DPM-Solver++, DDPM or Euler), so any scheduler that
takes an ε prediction works unchanged.

Supported folders:

* what :func:`dfkd.diffusion.train_diffusion` writes: ``unet/`` (a class-conditional
  ``UNet2DModel``; its last class index is the unconditional one used for classifier-free
  guidance), ``scheduler/`` and ``dfkd_diffusion.json`` (classes, image size);
* a diffusers pipeline folder with ``unet/`` (``UNet2DModel``), ``scheduler/`` and optionally
  ``vae/`` (``AutoencoderKL``: the loop runs in latent space and the teacher sees the decoded
  image);
* a bare ``UNet2DModel`` folder (``config.json`` + weights), sampled with a default DDPM
  noise schedule;
* a text-to-image pipeline folder (``unet/`` holding a ``UNet2DConditionModel``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``; needs ``transformers``, the
  ``text2image`` extra): one prompt per teacher class is built from the class names
  (``prompt="a photo of a {name}"``), and ``cfg`` is the usual text guidance scale against
  ``negative_prompt``.

Diffusers pipelines run under ``no_grad``; that is why the loop is written here.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.losses import js_divergence
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch

META_FILE = "dfkd_diffusion.json"
SCHEDULERS = ("ddim", "dpm", "ddpm", "euler", "saved")


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DfkdError("diffusion synthesis needs the 'diffusers' package: pip install 'dfkd[diffusion]'") from None

    diffusers.utils.logging.set_verbosity_error()  # no hub / accelerate notices for local folders
    return diffusers


@dataclass
class DiffusionModel:
    """The parts of a diffusion model that sampling needs."""

    unet: nn.Module
    scheduler_config: dict
    vae: Optional[nn.Module] = None
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None
    text_encoder: Optional[nn.Module] = None
    tokenizer: Any = None

    @property
    def text_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def class_conditional(self) -> bool:
        return getattr(self.unet.config, "num_class_embeds", None) is not None

    @property
    def num_class_embeds(self) -> int:
        return int(getattr(self.unet.config, "num_class_embeds", 0) or 0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet.config.in_channels), int(h), int(w)

    @property
    def null_class(self) -> Optional[int]:
        """The class index trained as "no class" (classifier-free guidance), if any."""
        v = self.meta.get("null_class")
        return None if v is None else int(v)

    def to(self, device) -> "DiffusionModel":
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                m.to(device)
        return self


def load_diffusion(path: str | Path, device: torch.device | str = "cpu") -> DiffusionModel:
    """Load a diffusion model from a local folder (see the module docstring for the layouts)."""
    diffusers = _require_diffusers()
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise DfkdError(f"diffusion model folder not found: {root}")
    if not root.is_dir():
        raise DfkdError(f"diffusion model path is not a folder: {root}")
    meta: dict = {}
    if (root / META_FILE).is_file():
        try:
            meta = json.loads((root / META_FILE).read_text())
        except ValueError as e:
            raise DfkdError(f"{root / META_FILE} is corrupt: {e}") from None
    if (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
    elif (root / "config.json").is_file():
        unet_dir = root
    else:
        raise DfkdError(f"{root} holds no diffusers UNet (expected unet/config.json or config.json)")
    try:
        cfg = json.loads((unet_dir / "config.json").read_text())
    except ValueError as e:
        raise DfkdError(f"{unet_dir / 'config.json'} is corrupt: {e}") from None
    cls_name = cfg.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise DfkdError(f"{unet_dir}: the diffusion synthesizer samples UNet2DModel or UNet2DConditionModel "
                        f"denoisers, this folder holds {cls_name}")
    try:
        unet = getattr(diffusers, cls_name).from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
        raise DfkdError(f"cannot load the UNet in {unet_dir}: {str(e).splitlines()[0]}") from None
    text_encoder = tokenizer = None
    if cls_name == "UNet2DConditionModel":
        text_encoder, tokenizer = _load_text_encoder(root)
    sched_file = root / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        try:
            sched_cfg = json.loads(sched_file.read_text())
        except ValueError as e:
            raise DfkdError(f"{sched_file} is corrupt: {e}") from None
    else:
        sched_cfg = dict(diffusers.DDPMScheduler().config)
    vae = None
    if (root / "vae" / "config.json").is_file():
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise DfkdError(f"cannot load the VAE in {root / 'vae'}: {str(e).splitlines()[0]}") from None
        vae.requires_grad_(False).eval()
    unet.requires_grad_(False).eval()
    return DiffusionModel(unet=unet, scheduler_config=sched_cfg, vae=vae, meta=meta, path=root,
                          text_encoder=text_encoder, tokenizer=tokenizer).to(device)


def _load_text_encoder(root: Path):
    """The text encoder and tokenizer of a text-to-image pipeline folder (transformers)."""
    try:
        import transformers
    except ImportError:
        raise DfkdError("text-to-image models need the 'transformers' package: pip install 'dfkd[text2image]'") from None
    transformers.logging.set_verbosity_error()
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise DfkdError(f"{root} holds a text-conditioned UNet but no {sub}/ folder")
    enc_cls = transformers.AutoModel
    index = root / "model_index.json"
    if index.is_file():
        try:
            entry = json.loads(index.read_text()).get("text_encoder")
            if isinstance(entry, list) and len(entry) == 2 and hasattr(transformers, entry[1]):
                enc_cls = getattr(transformers, entry[1])
        except ValueError:
            pass
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        text_encoder = enc_cls.from_pretrained(str(root / "text_encoder"), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise DfkdError(f"cannot load the text encoder/tokenizer in {root}: {str(e).splitlines()[0]}") from None
    text_encoder.requires_grad_(False).eval()
    return text_encoder, tokenizer


def make_scheduler(kind: str, config: dict):
    """A fresh scheduler of ``kind`` built from a saved noise-schedule config (ε prediction)."""
    diffusers = _require_diffusers()
    classes = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler",
               "euler": "EulerDiscreteScheduler"}
    if kind not in SCHEDULERS:
        raise DfkdError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    if kind == "saved":
        name = config.get("_class_name", "DDPMScheduler")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise DfkdError(f"saved scheduler class {name!r} is not in this diffusers version")
    else:
        cls = getattr(diffusers, classes[kind])
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg["prediction_type"] = "epsilon"  # the loop always hands over an ε estimate
    extra = {"clip_sample": False} if kind in ("ddim", "ddpm") else {}
    if kind == "dpm":
        extra = {"algorithm_type": "dpmsolver++", "thresholding": False}
    return cls.from_config({**cfg, **extra})


def check_model_path(path: Any, synthesizer: str, what: str) -> Path:
    """``synthesizer.path`` given (not empty, not an unfilled ``???``) and present on disk."""
    if path is None or str(path).strip() in ("", "???"):
        raise DfkdError(f"the {synthesizer!r} synthesizer needs synthesizer.path={what}")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise DfkdError(f"synthesizer.path not found: {p} (the {synthesizer!r} synthesizer reads {what})")
    return p


@SYNTHESIZERS.register("diffusion")
class DiffusionSynthesizer(Synthesizer):
    """Teacher-guided sampling from a local diffusers model.

    Settings: ``path`` (model folder), ``steps`` (denoising steps), ``scheduler``
    (ddim | dpm | ddpm | euler | saved), ``eta`` (DDIM noise), ``guidance`` (teacher guidance
    scale; 0 = plain sampling), ``guidance_start`` (fraction of steps after which guidance
    begins), weights ``ce``, ``bn`` (the teacher's statistics prior), ``adv`` (student–teacher
    disagreement, when a student is given), ``cfg`` (classifier-free guidance scale for models
    trained with a null class; 1 = plain conditional), ``class_map`` (teacher class → model class
    index, for class-conditional models trained on another label set), ``min_confidence``
    (keep images whose teacher probability of their class reaches it, sampling up to
    ``max_rounds`` times and topping up with the most confident rejects).
    """

    uses_student = True

    @classmethod
    def check_settings(cls, settings: dict) -> None:
        """Cheap checks of the settings, run before the teacher is built (which may mean training it)."""
        check_model_path(settings.get("path"), "diffusion", "MODEL_DIR (a local diffusers folder)")

    def __init__(self, teacher, path: Optional[str] = None, batch_size: int = 128, seed: int = 0,
                 device="cpu", steps: int = 20, scheduler: str = "ddim", eta: float = 0.0,
                 guidance: float = 1.0, guidance_start: float = 0.0, ce: float = 1.0, bn: float = 0.0,
                 prior: str = "auto", adv: float = 0.0, cfg: float = 1.0,
                 class_map: Optional[Sequence[int]] = None, min_confidence: float = 0.0,
                 max_rounds: int = 3, label_source: str = "target", class_names: Optional[Sequence[str]] = None,
                 prompt: str = "a photo of a {name}", negative_prompt: str = ""):
        self.check_settings({"path": path})
        super().__init__(teacher, batch_size, seed, device)
        self.model = load_diffusion(path, self.device)
        self.steps = int(steps)
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        self.scheduler_kind = str(scheduler)
        self.scheduler = make_scheduler(self.scheduler_kind, self.model.scheduler_config)
        self.eta = float(eta)
        self.guidance, self.guidance_start = float(guidance), float(guidance_start)
        self.w_ce, self.w_bn, self.w_adv, self.cfg_scale = float(ce), float(bn), float(adv), float(cfg)
        self.min_confidence, self.max_rounds = float(min_confidence), max(1, int(max_rounds))
        if label_source not in ("target", "teacher"):
            raise ValueError("label_source must be 'target' or 'teacher'")
        self.label_source = label_source
        self._check_shapes(class_map)
        self.prompt_embeds = self.negative_embeds = None
        if self.model.text_conditional:
            self._encode_prompts(class_names, prompt, negative_prompt)
        from dfkd.hooks import resolve_prior_name

        self.prior_name = resolve_prior_name(teacher.model, prior) if self.w_bn > 0 and self.guidance > 0 else None
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # -- set-up checks -------------------------------------------------------------------
    def _check_shapes(self, class_map) -> None:
        m = self.model
        c, h, w = self.input_size
        if m.vae is None:
            mc, mh, mw = m.sample_shape
            if mc != c:
                raise DfkdError(f"the diffusion model makes {mc}-channel images, the teacher takes {c} channels")
            self.resize = (mh, mw) != (h, w)
        else:
            self.resize = True  # decoded size is checked on the first sample
        self.class_map = None
        if m.class_conditional:
            n_embed = m.num_class_embeds
            if class_map is not None:
                cm = [int(v) for v in class_map]
                if len(cm) != self.num_classes or min(cm) < 0 or max(cm) >= n_embed:
                    raise DfkdError(f"class_map needs {self.num_classes} indices in [0, {n_embed})")
                self.class_map = torch.tensor(cm, device=self.device)
            elif n_embed < self.num_classes:
                raise DfkdError(f"the diffusion model knows {n_embed} classes, the teacher {self.num_classes}; "
                                "give synthesizer.class_map")
        if self.cfg_scale != 1.0 and not m.text_conditional and (not m.class_conditional or m.null_class is None):
            raise DfkdError("classifier-free guidance (cfg != 1) needs a class-conditional model trained with a "
                            "null class (dfkd-train-diffusion makes one)")

    @torch.no_grad()
    def _encode_prompts(self, class_names, prompt: str, negative_prompt: str) -> None:
        """One prompt per teacher class (``prompt`` with ``{name}``), encoded once."""
        names = list(class_names or [])
        if len(names) != self.num_classes:
            raise DfkdError(f"a text-to-image model needs the teacher's {self.num_classes} class names "
                            f"(synthesizer.class_names), got {len(names)}")
        if "{name}" not in prompt:
            raise DfkdError("synthesizer.prompt must contain {name}, e.g. 'a photo of a {name}'")
        self.prompts = [prompt.format(name=str(n).replace("_", " ")) for n in names]
        tok, enc = self.model.tokenizer, self.model.text_encoder

        def encode(texts):
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            return enc(ids)[0].float()

        self.prompt_embeds = encode(self.prompts)
        self.negative_embeds = encode([negative_prompt])

    # -- pieces --------------------------------------------------------------------------
    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space → teacher images in [0, 1] at the teacher's input size."""
        if self.model.vae is not None:
            sf = float(getattr(self.model.vae.config, "scaling_factor", 1.0))
            x0 = self.model.vae.decode(x0 / sf).sample
        img = (x0.clamp(-1, 1) + 1) / 2
        if self.resize and tuple(img.shape[-2:]) != tuple(self.input_size[-2:]):
            img = F.interpolate(img, size=self.input_size[-2:], mode="bilinear", align_corners=False, antialias=True)
        return img

    def _eps(self, xin: torch.Tensor, t: torch.Tensor, classes: Optional[torch.Tensor]) -> torch.Tensor:
        unet = self.model.unet
        if self.prompt_embeds is not None:  # text-to-image: classes are teacher classes → prompts
            cond = self.prompt_embeds[classes].to(xin.dtype)
            if self.cfg_scale == 1.0:
                return unet(xin, t, encoder_hidden_states=cond).sample.float()
            neg = self.negative_embeds.expand(len(xin), -1, -1).to(xin.dtype)
            both = unet(torch.cat([xin, xin]), t, encoder_hidden_states=torch.cat([cond, neg])).sample.float()
            c, u = both.chunk(2)
            return u + self.cfg_scale * (c - u)
        if classes is None:
            return unet(xin, t).sample.float()
        if self.cfg_scale == 1.0:
            return unet(xin, t, class_labels=classes).sample.float()
        null = torch.full_like(classes, self.model.null_class)
        both = unet(torch.cat([xin, xin]), t, class_labels=torch.cat([classes, null])).sample.float()
        cond, uncond = both.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ of the current step in variance-preserving terms (the model's input space)."""
        sched = self.scheduler
        if self.scheduler_kind == "euler" or (self.scheduler_kind == "saved" and hasattr(sched, "sigmas")
                                             and getattr(sched, "step_index", None) is not None):
            sigma = sched.sigmas[sched.step_index].to(self.device, torch.float32)
            return 1.0 / (1.0 + sigma ** 2)
        return self.alphas_cumprod[int(t)]

    def _guide(self, x0: torch.Tensor, labels: torch.Tensor, prior, student) -> tuple[torch.Tensor, dict]:
        x0 = x0.detach().requires_grad_(True)
        img = self._decode(x0)
        logits = self.teacher(img).float()
        ce = F.cross_entropy(logits, labels)
        loss = self.w_ce * ce
        stats = {"syn/ce": float(ce.detach())}
        if prior is not None:
            p = prior.loss()
            loss = loss + self.w_bn * p
            stats["syn/prior"] = float(p.detach())
        if self.w_adv > 0 and student is not None:
            adv = js_divergence(logits, student(img))
            loss = loss - self.w_adv * adv
            stats["syn/adv"] = float(adv.detach())
        (g,) = torch.autograd.grad(loss, [x0])
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        return g / rms, stats

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, student: nn.Module | None = None,
               guidance: Optional[float] = None) -> tuple[torch.Tensor, dict]:
        """Sample one batch of images in [0, 1] for ``labels`` (teacher class ids)."""
        guidance = self.guidance if guidance is None else float(guidance)
        m = self.model
        n = len(labels)
        classes = None
        if m.text_conditional:
            classes = labels
        elif m.class_conditional:
            classes = self.class_map[labels] if self.class_map is not None else labels
        shape = m.sample_shape if m.vae is None else (m.unet.config.in_channels, *m.sample_shape[1:])
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=self.device)
        x = self.randn(n, *shape) * float(getattr(sched, "init_noise_sigma", 1.0))
        start = int(round(self.guidance_start * len(sched.timesteps)))
        step_kw = {"eta": self.eta, "generator": self.rng} if self.scheduler_kind == "ddim" else {}
        if self.scheduler_kind in ("ddpm", "euler", "dpm"):
            step_kw = {"generator": self.rng}
        stats: dict[str, float] = {}
        ctx = (self.teacher.statistics(self.prior_name) if (self.prior_name and guidance > 0) else nullcontext())
        was_training = student.training if student is not None else False
        if student is not None and self.w_adv > 0:
            student.eval()
        try:
            with ctx as prior:
                for i, t in enumerate(sched.timesteps):
                    xin = sched.scale_model_input(x, t)  # variance-preserving x_t for every scheduler
                    eps = self._eps(xin, t, classes)
                    if guidance > 0 and i >= start:
                        a = self._alpha_bar(t)
                        sa, s1a = a.sqrt(), (1 - a).sqrt()
                        x0 = (xin.float() - s1a * eps) / sa
                        with torch.enable_grad():
                            g, stats = self._guide(x0, labels, prior, student)
                        x0 = x0 - guidance * s1a * g
                        eps = (xin.float() - sa * x0) / s1a
                    x = sched.step(eps.to(x.dtype), t, x, **step_kw).prev_sample
                img = self._decode(x.float()).clamp_(0, 1)
        finally:
            if student is not None:
                student.train(was_training)
        return img, stats

    # -- protocol ------------------------------------------------------------------------
    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        n = self.batch_size
        labels = self.sample_labels(n)
        if self.min_confidence <= 0:
            img, stats = self.sample(labels, student)
            t = self.teacher_logits(img)
        else:
            imgs, labs, logits, conf = [], [], [], []
            need = labels
            for _ in range(self.max_rounds):
                im, stats = self.sample(need, student)
                lg = self.teacher_logits(im)
                c = lg.softmax(1).gather(1, need[:, None])[:, 0]
                imgs.append(im), labs.append(need), logits.append(lg), conf.append(c)
                kept = torch.cat(conf) >= self.min_confidence
                if int(kept.sum()) >= n:
                    break
                need = need[c < self.min_confidence]
            im, lb, lg, c = (torch.cat(v) for v in (imgs, labs, logits, conf))
            passed = c >= self.min_confidence
            stats = {**stats, "syn/kept_fraction": float(passed[:n].float().mean()) if len(c) else 0.0}
            order = torch.argsort(passed.float() * 2 + c, descending=True)[:n]  # passing first, then most confident
            img, labels, t = im[order], lb[order], lg[order]
        stats["syn/teacher_acc"] = float((t.argmax(1) == labels).float().mean())
        stats["syn/teacher_conf"] = float(t.softmax(1).max(1).values.mean())
        if self.label_source == "teacher":
            labels = t.argmax(1)
        return SyntheticBatch(images=img.detach(), labels=labels, teacher_logits=t, stats=stats)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict()


def guidance_gain(synth: DiffusionSynthesizer, n: int = 64) -> dict[str, float]:
    """Mean teacher probability of the target class with and without guidance, same seed."""
    labels = synth.sample_labels(n)
    state = synth.rng.get_state()
    plain, _ = synth.sample(labels, guidance=0.0)
    synth.rng.set_state(state)
    guided, _ = synth.sample(labels)
    p0 = synth.teacher_logits(plain).softmax(1).gather(1, labels[:, None]).mean()
    p1 = synth.teacher_logits(guided).softmax(1).gather(1, labels[:, None]).mean()
    return {"unguided": float(p0), "guided": float(p1)}

"""How synthetic images are made: one module per method, all behind one protocol.

Importing this package registers the built-in synthesizers in :data:`SYNTHESIZERS`.
"""

from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch, build_synthesizer
from generators import baselines, inversion, adversarial, meta  # noqa: F401  (registration)
from generators import stored, procedural  # noqa: F401  (registration)

__all__ = ["SYNTHESIZERS", "Synthesizer", "SyntheticBatch", "build_synthesizer"]
from generators import diffusion  # noqa: F401,E402  (registration; needs diffusers only when used)
from generators import box_inversion  # noqa: F401,E402  (registration: box_inversion, box_noise)

"""Noise schedules, the per-example diffusion loss, DDPM/DDIM samplers with guidance."""

from jaxldm.diffusion.losses import diffusion_loss
from jaxldm.diffusion.samplers import sample
from jaxldm.diffusion.schedules import Schedule, make_schedule, q_sample, target, to_x0_eps

__all__ = ["diffusion_loss", "sample", "Schedule", "make_schedule", "q_sample", "target", "to_x0_eps"]

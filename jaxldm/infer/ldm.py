"""The latent UNet at inference: building it from a run's model config and the apply function the
samplers (`jaxldm.diffusion.sample`) call.
"""

from __future__ import annotations

from jaxldm.infer.autoencoder import DTYPES
from jaxldm.models import LatentUNet
from jaxldm.models.layers import as_triple


def build_unet(model_cfg, num_attributes: int, latent_channels: int) -> LatentUNet:
  m = dict(model_cfg)
  return LatentUNet(out_channels=latent_channels, base_channels=m["base_channels"],
                    channel_mult=tuple(m["channel_mult"]), num_res_blocks=m["num_res_blocks"],
                    attention_levels=tuple(m["attention_levels"]), mid_attention=m["mid_attention"],
                    heads=m["heads"], kernel=as_triple(m["kernel"]), stride=as_triple(m["stride"]),
                    num_attributes=num_attributes, context_dim=m["context_dim"],
                    # Runs recorded before the key existed had no attribute embedding.
                    attribute_embedding=bool(m.get("attribute_embedding", False)),
                    dtype=DTYPES[m["dtype"]])


def unet_apply(unet: LatentUNet):
  def apply_fn(params, x_t, t, attributes, mask):
    return unet.apply(params, x_t, t, attributes, mask)
  return apply_fn

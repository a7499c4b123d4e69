"""Flax linen modules: 3D KL autoencoder, latent UNet, attribute encoder, PatchGAN critic.

GroupNorm/LayerNorm only: batch statistics would couple examples and break per-example DP.
"""

from jaxldm.models.autoencoder import (AutoencoderKL, PatchDiscriminator3D, Posterior,
                                       kl_divergence)
from jaxldm.models.unet import AttributeEncoder, AttentionBlock3D, LatentUNet

__all__ = ["AutoencoderKL", "PatchDiscriminator3D", "Posterior", "kl_divergence",
           "AttributeEncoder", "AttentionBlock3D", "LatentUNet"]

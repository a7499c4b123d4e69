"""jaxldm: differentially private 3D latent diffusion models for medical volumes."""

__version__ = "0.1.0"

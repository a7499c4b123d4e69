"""Trainers and what they share.

  autoencoder.py  first stage: the 3D KL autoencoder (plain, or DP-SGD on private data)
  ldm.py          second stage: the attribute-conditioned latent UNet (plain, or DP finetuning)
  ldm_seeds.py    several DP LDM runs differing only in their seeds, in one vmapped program
  ssl.py          the contrastive 3D encoder used by the memorization metrics
  regressor.py    attribute regressor for controllability (and DP training for the utility study)
  dp.py           the DP-SGD plumbing of the trainers: ledger, secret seeds, Poisson batches,
                  the private gradient and what it releases (docs/privacy.md)
  common.py       train state, optimizers, checkpoints, metric logs, sharding helpers
  generate.py     sampling a trained LDM and writing volumes (with the release safeguard)
"""

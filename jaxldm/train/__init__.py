"""Trainers and what they share.

  loop.py         the one training loop every trainer runs: restore and resume checks, cadence of
                  logs/samples/checkpoints, finiteness, the DP budget stop and ledger
  autoencoder.py  first stage: the 3D KL autoencoder (plain, or DP-SGD on private data)
  ldm.py          second stage: the attribute-conditioned latent UNet (plain, or DP finetuning)
  ldm_seeds.py    several DP LDM runs differing only in their seeds, in one vmapped program
  ssl.py          the contrastive 3D encoder used by the memorization metrics
  regressor.py    attribute regressor for controllability
  dp.py           the DP-SGD plumbing of the trainers: ledger, secret seeds, Poisson batches,
                  the private gradient and what it releases (docs/privacy.md)
  common.py       mesh and sharding helpers, the resumable checkpointer, workdir, metric logs
  distributed.py  multi-host: joining jax.distributed, agreeing on secrets, one writing process
  partition.py    trainable/frozen parameter split

Loading trained models and sampling are `jaxldm.infer`; the train state and optimizer are
`jaxldm.fitting`.
"""

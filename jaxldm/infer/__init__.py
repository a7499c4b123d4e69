"""Using trained models: what sampling, evaluation and the trainers' later stages read from a workdir.

  checkpoints.py  parameters of a run's latest checkpoint, host copies, atomic JSON, fixed-size batches
  pictures.py     PNG grids of middle slices
  autoencoder.py  the 3D KL autoencoder: build, load a trained one, encode/decode latents
  ldm.py          the latent UNet: build, the apply function the samplers call
  ssl.py          the SSL encoder: build, weight version, embeddings
  regressor.py    the attribute regressor: build, load a trained one, predict
  generate.py     sampling a trained LDM and writing volumes (with the release safeguard)

Nothing here imports `jaxldm.train` (tests/test_layering.py checks it): evaluation and the CLI load
models without the training code, and the trainers build on these pieces.
"""

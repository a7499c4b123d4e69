"""Config presets shipped with jaxldm: `--config NAME[:variant]` (e.g. `--config ldm_dp:tiny`).

Each module here is one preset with a `get_config(arg)` (arg = the variant after the colon), loaded
by `jaxldm.config.load_config` / `jaxldm.config.preset`. They are part of the package, so the same
names work from any working directory and after a non-editable `pip install`. The config groups
they assemble are library functions (`jaxldm.data.defaults.data_config`,
`jaxldm.train.ldm_config.ldm_config`, `autoencoder.autoencoder_config`, ...); a preset that builds
on another reaches it through `jaxldm.config.preset(NAME, arg)`, as a user's own config file does.
"""

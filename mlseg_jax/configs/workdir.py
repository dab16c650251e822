r"""The config a run recorded in its workdir, as a config file: `--config
configs/workdir.py:WORKDIR` loads WORKDIR/config.json.

eval and predict may leave out `--config` (the workdir's config is the run's); overrides
given then (`--config.eval.run=ms_flip`) apply to that config, through this file
(`main.py` passes it when the command line has overrides and no `--config`).
"""

from mlseg_jax import errors


def get_config(workdir: str = ""):
  from mlseg_jax.configs import validate

  if not workdir:
    raise errors.UsageError("configs/workdir.py needs the workdir: "
                            "--config=configs/workdir.py:WORKDIR")
  config = validate.workdir_config(workdir)
  if config is None:
    raise errors.UsageError(f"{workdir} holds no {validate.CONFIG_FILE} (no run was started "
                            "there): pass --config")
  return config

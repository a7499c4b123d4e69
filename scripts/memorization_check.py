"""Does the copy detector work? Exact and near copies of training volumes vs fresh phantoms.

  python scripts/memorization_check.py runs/demo        # after `make demo`

Uses the demo's contrastive encoder (runs/demo/ssl) and private training phantoms. The threshold tau
(Dar et al.) is the 95th percentile of each training volume's correlation to its nearest validation
volume; the validation set here is 64 fresh phantoms, the size of the training set (a smaller
validation set biases tau low: the best of fewer candidates is a worse match). Prints the fraction
flagged as copies for exact copies, copies with Gaussian noise (std 0.05 in [-1, 1] units) and 136
other fresh phantoms (the issue asks >= 0.95, >= 0.95 and < 0.05).
"""

import json
import pathlib
import sys
import tempfile

import ml_collections
import numpy as np

from jaxldm.data import phantoms
from jaxldm.data.defaults import build_dataset
from jaxldm.eval import features
from jaxldm.eval import memorization as mem


def main(demo: pathlib.Path) -> None:
  cfg = ml_collections.ConfigDict(json.loads((demo / "ldm_dp/config.json").read_text())["data"])

  def load(root):
    c = cfg.copy_and_resolve_references()
    c.root, c.strict_ids = str(root), False
    return build_dataset(c).arrays()[0]

  with tempfile.TemporaryDirectory() as tmp:
    fresh_dir = pathlib.Path(tmp) / "fresh"
    phantoms.write_dataset(fresh_dir, 200, domain="private", shape=tuple(cfg.shape), spacing=tuple(cfg.spacing),
                           seed=3, progress=False)
    fresh = load(fresh_dir)
  train = load(demo / "phantoms/private")
  extractor = features.get_extractor("ssl3d", weights=demo / "ssl")
  train_f, fresh_f = extractor(train), extractor(fresh)
  tau = mem.copy_threshold(train_f, fresh_f[:len(train)], 95.0)
  rng = np.random.default_rng(0)
  half = len(train) // 2
  near = train[half:] + rng.normal(0.0, 0.05, train[half:].shape).astype(np.float32)
  print(f"extractor {extractor.version}, tau {tau:.4f} ({len(train)} training, {len(train)} validation)")
  for name, x in (("exact copies", extractor(train[:half])), ("near copies (noise 0.05)", extractor(near)),
                  (f"fresh phantoms ({len(fresh) - len(train)})", fresh_f[len(train):])):
    print(f"{name}: flagged as copies {mem.copy_rates(x, train_f, tau)['synthetic_copy_rate']:.3f}")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))

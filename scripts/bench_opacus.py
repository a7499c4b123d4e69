"""PyTorch/Opacus twin of `jaxldm bench grads` (the code: jaxldm/bench/torch_twin.py).

  python scripts/bench_opacus.py --model unet --config ldm:tiny --batch 8,16 \
      --json benchmarks/cpu_unet_tiny_opacus.json [--device cuda]

`jaxldm bench compare --model unet --config ldm:tiny` runs this and jaxldm back to back
and prints the ratios. Needs torch and opacus: pip install -e '.[bench]'.
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Run as a script from anywhere: jaxldm is importable (editable install or not).
  sys.path.insert(0, str(REPO))

from jaxldm.bench.compare import load_twin  # noqa: E402
from jaxldm.config import ConfigError  # noqa: E402

if __name__ == "__main__":
  try:
    twin = load_twin()
  except ConfigError as e:
    print(f"bench_opacus: error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(twin.main())

#!/usr/bin/env bash
# One-call GPU check of jaxldm's DP gradient modes (docs: jaxldm/bench/gpu_check.py).
#
#   bash scripts/gpu_check.sh                          # paper-size models on the GPU (--budget-s 450)
#   bash scripts/gpu_check.sh --tiny --out /tmp/gc     # the same run end to end on a CPU, small models
#   bash scripts/gpu_check.sh --models unet --batch 8  # any `jaxldm bench gpu-check` option
#
# Writes benchmarks/gpu/<device>_paper_{jaxldm,opacus,summary}.json and appends rows to
# benchmarks/RESULTS.md under "## GPU check" (with --tiny: into --out).
#
# Python: $PYTHON if set, else the repository's .venv, else python3 (e.g. a GPU machine's own
# JAX/PyTorch image; the repository is put on PYTHONPATH, no install needed). Pure-Python packages
# that image lacks (ml_collections, dp-accounting, nibabel, opacus) travel in .gpu_site/:
#   bash scripts/gpu_check.sh --pack   # copies them from .venv into .gpu_site/ (git-ignored locally)
# or as wheels in .whl/ (installed into /tmp/jaxldm_site first).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--pack" ]]; then
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf .gpu_site && mkdir -p .gpu_site
  for m in ml_collections dp_accounting nibabel opacus; do
    cp -r "$site/$m" .gpu_site/
    cp -r "$site/$m"-*.dist-info .gpu_site/ 2>/dev/null || true
  done
  grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
  find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
  du -sh .gpu_site
  exit 0
fi
if [[ -d .gpu_site ]]; then
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import jax" 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/jaxldm_site .whl/*.whl
  export PYTHONPATH="/tmp/jaxldm_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX grows its GPU memory as needed instead of taking 75% up front: the Opacus twin runs in a second process.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if ! "$py" -c "import jaxldm.bench.gpu_check" 2>/tmp/jaxldm_gpu_check_import.txt; then
  echo "gpu_check.sh: $py cannot import jaxldm: $(tail -n 1 /tmp/jaxldm_gpu_check_import.txt)" >&2
  echo "gpu_check.sh: install it (pip install -e '.[bench]') or put the missing packages as wheels in .whl/" >&2
  exit 2
fi
"$py" -c "import jax; print('gpu_check.sh:', jax.__version__, jax.devices())"
exec "$py" -m jaxldm.cli bench gpu-check "$@"

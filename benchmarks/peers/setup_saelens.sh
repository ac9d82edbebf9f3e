#!/usr/bin/env bash
# Makes benchmarks/.venvs/saelens: SAELens (PyPI sae-lens, import sae_lens) in its own environment
# (never a dependency of sparsecraft), used by peers/sae_peer_train.py --peer saelens.
# torch==2.13.0 goes in first and stays pinned (-c constraints.txt on every install), so pip cannot
# pull a CUDA build. Pins, and why:
# - sae-lens==6.54.12 by default: the newest release when this was written, the one
#   sae_peer_train.py was checked against (it uses SAETrainer and the TopK/BatchTopK training SAEs
#   of the v6 API); it accepts torch 2.13, so no older release is needed.
#   SAE_LENS_VERSION=x.y.z picks another release; SAE_LENS_VERSION= (empty) the newest.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/saelens"
constraints="$here/../constraints.txt"
version="${SAE_LENS_VERSION-6.54.12}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c "$constraints" torch==2.13.0
"$venv/bin/pip" install -q -c "$constraints" "sae-lens${version:+==$version}" safetensors numpy
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import torch

print("sae-lens", md.version("sae-lens"), "torch", torch.__version__, "numpy", md.version("numpy"),
      "safetensors", md.version("safetensors"), "python", sys.version.split()[0])
nvidia = sorted(d.metadata["Name"] for d in md.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
if torch.version.cuda is not None or "+cpu" not in torch.__version__ or nvidia:
    print(f"WARNING: a CUDA torch build got in (torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"packages {nvidia})", file=sys.stderr)
PY

#!/usr/bin/env bash
# Makes benchmarks/.venvs/sparsify: EleutherAI sparsify (PyPI eai-sparsify, import sparsify; the PyPI
# project named "sparsify" is Neural Magic's unrelated Sparsify) in its own environment (never a
# dependency of sparsecraft), used by peers/sae_peer_train.py --peer sparsify.
# torch==2.13.0 goes in first and stays pinned (-c constraints.txt on every install), so pip cannot
# pull a CUDA build. Pins, and why:
# - eai-sparsify==1.3.3 by default: the newest release when this was written, the one
#   sae_peer_train.py was checked against (it drives sparsify.Trainer's internals: hooks, dead-latent
#   bookkeeping, the ScheduleFree SignSGD optimiser); it accepts torch 2.13, so no older release is
#   needed. EAI_SPARSIFY_VERSION=x.y.z picks another release; EAI_SPARSIFY_VERSION= (empty) the newest.
# - no triton here (CPU): sparsify then prints "Triton not installed, using eager implementation".
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/sparsify"
constraints="$here/../constraints.txt"
version="${EAI_SPARSIFY_VERSION-1.3.3}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c "$constraints" torch==2.13.0
"$venv/bin/pip" install -q -c "$constraints" "eai-sparsify${version:+==$version}" safetensors numpy
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import torch

print("eai-sparsify", md.version("eai-sparsify"), "torch", torch.__version__, "numpy",
      md.version("numpy"), "safetensors", md.version("safetensors"), "schedulefree",
      md.version("schedulefree"), "python", sys.version.split()[0])
nvidia = sorted(d.metadata["Name"] for d in md.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
if torch.version.cuda is not None or "+cpu" not in torch.__version__ or nvidia:
    print(f"WARNING: a CUDA torch build got in (torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"packages {nvidia})", file=sys.stderr)
PY

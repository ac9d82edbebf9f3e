#!/usr/bin/env bash
# Makes benchmarks/.venvs/deepsparse: DeepSparse and ONNX Runtime in their own environment (never
# dependencies of sparsecraft), used by peers/onnx_linear.py. No torch here. Pins, and why:
# - Python 3.11: deepsparse 1.8.0 ships wheels up to cp311 only;
# - deepsparse==1.8.0: 1.9.0 is an end-of-life stub that refuses to build;
# - numpy<2: the 1.8.0 engine's extension is built against numpy 1.x (it declares no upper bound);
# - onnx<1.15: deepsparse 1.8.0 declares it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/deepsparse"
py="${PYTHON311:-$(command -v python3.11 || true)}"
if [ -z "$py" ]; then
  echo "no python3.11 on PATH (set PYTHON311=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "deepsparse==1.8.0" "numpy<2" "onnx<1.15" "onnxruntime${ONNXRUNTIME_VERSION:+==$ONNXRUNTIME_VERSION}"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch got into $venv (pulled by a dependency); the peers must not use it" >&2
fi
"$venv/bin/python" - <<'EOF'
import deepsparse, numpy, onnx, onnxruntime
print("deepsparse", deepsparse.__version__, "onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__,
      "numpy", numpy.__version__)
EOF

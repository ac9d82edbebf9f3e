#!/usr/bin/env bash
# Makes benchmarks/.venvs/llmcompressor: llm-compressor in its own environment (never a dependency
# of sparsecraft). torch==2.13.0 goes in first and stays pinned, so pip cannot pull a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/llmcompressor"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -c "$here/../constraints.txt" torch==2.13.0
"$venv/bin/pip" install -q -c "$here/../constraints.txt" "llmcompressor${LLMCOMPRESSOR_VERSION:+==$LLMCOMPRESSOR_VERSION}" gguf
"$venv/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"

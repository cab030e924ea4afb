#!/usr/bin/env bash
# Fresh-machine install: a venv at .venv with CPU torch (or the CUDA torch already present on GPU
# nodes), k2sys built with its C++/CUDA extensions, and the test/dev dependencies.
#   K2SYS_VENV=path   venv location (default: .venv in the repo)
#   K2SYS_TORCH=spec  torch requirement (default: torch==2.13.0, the CPU wheel on CPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${K2SYS_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # An unpinned torch pulls a multi-GB CUDA build: install the CPU wheel first on CPU machines.
  python -m pip install -q "${K2SYS_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
python -c "import k2sys, k2sys._C; from k2sys import ext; print('k2sys installed:', ext.summary())"

# SGLang's Python modules for the tests that decode our weight payloads with SGLang's own code
# (tests/sglang_ref.py), on CPU machines only: sglang without its dependency set (which pins a CUDA
# torch, docs/FACTS.md), the pure-Python packages its modules import with this venv's torch pinned, and a
# torchvision for its imports kept out of site-packages (the matching wheel is a CUDA build; see
# tests/sglang_ref.py). GPU nodes that serve with SGLang install it whole instead
# (pip install sglang==0.5.23): a --no-deps copy there would make pip skip its dependencies.
if python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  if ! python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sglang') else 1)"; then
    python -m pip install -q --no-deps "sglang==0.5.23"
  fi
  pins=$(mktemp)
  python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$pins"
  python -m pip install -q -c "$pins" -r scripts/requirements-sglang-cpu.txt
  rm -f "$pins"
  tv=$(python -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.*')")
  site=$(python -c "import sys; print(sys.prefix)")/sglang-cpu-site
  [ -d "$site/torchvision" ] || python -m pip install -q --no-deps --target "$site" "torchvision==$tv"
fi

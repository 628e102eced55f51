#!/usr/bin/env bash
# On the GPU machine (no registry): unpack what scripts/gpu_bundle.sh packed into /tmp/site and
# print the exports to use it. Usage: eval "$(bash scripts/gpu_env.sh)"
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
site=/tmp/site
if [[ ! -d "$site/onnxruntime" ]]; then
    mkdir -p "$site"
    # Python's own lzma: the GPU machine has no zstd and maybe no xz.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$repo_root/.gpu/ort.tar.xz" "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$repo_root"/.gpu/*.whl >&2
fi
# The CUDA provider dlopens cuDNN/cuBLAS from the nvidia-* wheels that the machine's torch uses.
libs="$(python3 -c 'import glob, os, nvidia; print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))')"
echo "export PYTHONPATH=$site:$repo_root; export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"

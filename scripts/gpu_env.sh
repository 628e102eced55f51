#!/usr/bin/env bash
# On the GPU machine (no registry): unpack what scripts/gpu_bundle.sh (.gpu/: onnxruntime-gpu,
# pymetis) and scripts/gpu_bundle_java.sh (.gpujava/: a Java runtime, TorchServe) packed, into
# /tmp/site and /tmp/jre, and print the exports to use them. Usage: eval "$(bash scripts/gpu_env.sh)"
# The two bundles travel in separate calls (together they pass 64 MiB); what one call unpacked
# stays while the machine is warm, so the second call finds the first one's ORT in /tmp/site.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
site=/tmp/site
untar() {  # Python's own lzma: the GPU machine has no zstd and maybe no xz.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"
}
mkdir -p "$site"
if [[ ! -d "$site/onnxruntime" ]]; then
    if [[ ! -f "$repo_root/.gpu/ort.tar.xz" ]]; then
        echo "echo 'gpu_env: no onnxruntime-gpu: carry .gpu (this machine is fresh)' >&2; false"
        exit 0
    fi
    untar "$repo_root/.gpu/ort.tar.xz" "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$repo_root"/.gpu/*.whl >&2
fi
java_exports=""
if [[ -f "$repo_root/.gpujava/ts.tar.xz" && ! -x /tmp/jre/bin/java ]]; then
    untar "$repo_root/.gpujava/ts.tar.xz" /tmp/tsbundle
    cp -a /tmp/tsbundle/site/. "$site/"
    mv /tmp/tsbundle/jre /tmp/jre
    rm -rf /tmp/tsbundle
fi
if [[ -x /tmp/jre/bin/java ]]; then
    java_exports="; export JAVA_HOME=/tmp/jre; export PATH=/tmp/jre/bin:\$PATH"
fi
# The CUDA provider dlopens cuDNN/cuBLAS from the nvidia-* wheels that the machine's torch uses.
libs="$(python3 -c 'import glob, os, nvidia; print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))')"
echo "export PYTHONPATH=$site:$repo_root; export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}$java_exports"

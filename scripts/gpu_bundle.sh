#!/usr/bin/env bash
# Here (with a package registry): pack what the GPU machine lacks into .gpu/ (git-ignored through
# .git/info/exclude), small enough for the device tool's 64 MiB a call:
#   .gpu/ort.tar.xz    onnxruntime-gpu for Python 3.12 without the C API library and TensorRT,
#                      its CUDA provider pruned to sm_90 cubins (scripts/prune_fatbin.py)
#   .gpu/*.whl         pymetis
# On the GPU machine, scripts/gpu_env.sh unpacks them.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ort_version="${ORT_VERSION:-1.31.1}"
sm="${KEEP_SM:-90}"
out="$repo_root/.gpu"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out" "$repo_root/.git/info"
grep -qx "/.gpu/" "$repo_root/.git/info/exclude" 2>/dev/null || echo "/.gpu/" >> "$repo_root/.git/info/exclude"
platform=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${platform[@]}" -d "$tmp" "onnxruntime-gpu==$ort_version" "pymetis==2025.2.2"
(cd "$tmp" && python3 -m zipfile -e onnxruntime_gpu-*.whl unpacked)
capi="$tmp/unpacked/onnxruntime/capi"
# The Python binding links ORT statically: the C API library and TensorRT are not needed.
rm -f "$capi"/libonnxruntime.so.* "$capi"/libonnxruntime_providers_tensorrt.so
rm -rf "$tmp/unpacked/onnxruntime/transformers" "$tmp/unpacked/onnxruntime/quantization"
python3 "$repo_root/scripts/prune_fatbin.py" "$capi/libonnxruntime_providers_cuda.so" "$sm" "$tmp/pruned.so"
mv "$tmp/pruned.so" "$capi/libonnxruntime_providers_cuda.so"
(cd "$tmp/unpacked" && tar cf - onnxruntime onnxruntime_gpu-*.dist-info) \
    | xz -9e -T0 -c > "$out/ort.tar.xz"
cp "$tmp"/pymetis-*.whl "$out/"
du -ch "$out"/* | tail -1

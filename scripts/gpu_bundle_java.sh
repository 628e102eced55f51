#!/usr/bin/env bash
# Here (with a package registry and a JDK): pack a real TorchServe for the GPU machine, which has
# no Java and no registry, into .gpujava/ts.tar.xz (git-ignored through .git/info/exclude):
#   jre/     a jlink'ed Java 17 runtime with the modules TorchServe's frontend uses
#   site/    torchserve and torch-model-archiver, unzipped (pure-Python wheels); the frontend's
#            jar is re-stored uncompressed without the natives of other platforms, so xz can
#            squeeze it (a deflated jar does not shrink)
# A separate folder from .gpu/: both together pass the device tool's 64 MiB a call, so one call
# carries .gpu (ORT, unpacked into /tmp/site and kept while the machine stays warm) and the next
# carries .gpujava. scripts/gpu_env.sh unpacks whichever is there.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ts_version="${TS_VERSION:-0.12.0}"
jdk="${JDK_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v javac || command -v java)")")")}"
out="$repo_root/.gpujava"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out" "$repo_root/.git/info"
grep -qx "/.gpujava/" "$repo_root/.git/info/exclude" 2>/dev/null || echo "/.gpujava/" >> "$repo_root/.git/info/exclude"

[[ -d "$jdk/jmods" ]] || { echo "no jmods under $jdk: set JDK_HOME to a full JDK 17" >&2; exit 1; }
# jdeps cannot read the frontend's fat jar; these are the modules its libraries load
# (netty, gRPC, log4j, Guava, the JMX metrics), checked by starting a server on this runtime.
"$jdk/bin/jlink" --output "$tmp/pack/jre" --strip-debug --no-header-files --no-man-pages \
    --add-modules java.base,java.logging,java.management,java.naming,java.xml,java.sql,jdk.unsupported,jdk.management,java.desktop,jdk.crypto.ec,java.net.http,java.scripting,java.instrument,jdk.zipfs

python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/wheels" \
    "torchserve==$ts_version" "torch-model-archiver==$ts_version"
mkdir -p "$tmp/pack/site"
for wheel in "$tmp"/wheels/*.whl; do
    (cd "$tmp/pack/site" && python3 -m zipfile -e "$wheel" .)
done
jar="$tmp/pack/site/ts/frontend/model-server.jar"
python3 - "$jar" <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    entries = [(i, src.read(i)) for i in src.infolist()]
foreign = ("windows", "osx", "aarch_64", "ppcle_64", "s390x", "riscv64")
with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
    for info, data in entries:
        if info.filename.startswith("META-INF/native/") and any(f in info.filename for f in foreign):
            continue
        info.compress_type = zipfile.ZIP_STORED
        dst.writestr(info, data)
PY
(cd "$tmp/pack" && tar cf - jre site) | xz -9 -T0 -c > "$out/ts.tar.xz"
du -h "$out/ts.tar.xz"

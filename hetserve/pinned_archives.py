"""Check a pinned .mar before TorchServe starts (issue 17, item 7).

The worker's own check (handlers/archive_digest.py) runs after TorchServe has imported the
archive's entry handler; this one runs before: the manifest's SHA-256 must be the pinned one, and
every file of the zip must be one the manifest lists, with its hash (TorchServe's own
MAR-INF/MANIFEST.json aside, whose handler must be hetserve's entry handler).

    python -m hetserve.pinned_archives model_store/resnet18.mar [...]   # HETSERVE_ARCHIVE_SHA256 set
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

from handlers.artifact.archive_digest import DIGEST_ENV, expected_digest
from handlers.artifact.manifest import MANIFEST_NAME

HANDLER_ENTRY = "hetserve_handler.py"
ARCHIVER_RECORD = "MAR-INF/MANIFEST.json"


class PinError(ValueError):
    """The archive is not the pinned one, or holds a file its manifest does not vouch for."""


def verify_mar(mar: Path, pinned: str) -> bool:
    """True if ``pinned`` names a digest for this archive and it holds; False if nothing is pinned
    for it; raises PinError otherwise."""
    with zipfile.ZipFile(mar) as z:
        raw = z.read(MANIFEST_NAME)
        manifest = json.loads(raw)
        expected = expected_digest(pinned, str(manifest.get("model_name", "")))
        if expected is None:
            return False
        if hashlib.sha256(raw).hexdigest() != expected:
            raise PinError(f"{mar.name}: {MANIFEST_NAME} is not the one {DIGEST_ENV} pins")
        files = manifest.get("files") or {}
        for info in z.infolist():
            if info.is_dir() or info.filename in (MANIFEST_NAME, ARCHIVER_RECORD):
                continue
            entry = files.get(info.filename)
            if entry is None:
                raise PinError(f"{mar.name}: {info.filename!r} is not listed in the manifest")
            if hashlib.sha256(z.read(info)).hexdigest() != entry.get("sha256"):
                raise PinError(f"{mar.name}: {info.filename!r} does not match its SHA-256")
        handler = json.loads(z.read(ARCHIVER_RECORD)).get("model", {}).get("handler")
        if handler != HANDLER_ENTRY:
            raise PinError(f"{mar.name}: TorchServe would import {handler!r}, not {HANDLER_ENTRY}")
    return True


def main(argv: list[str] | None = None) -> int:
    pinned = os.environ.get(DIGEST_ENV, "")
    status = 0
    for name in argv if argv is not None else sys.argv[1:]:
        try:
            ok = verify_mar(Path(name), pinned)
            print(f"{name}: {'pinned digest holds' if ok else 'not pinned'}")
        except (PinError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            print(f"{name}: refused: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""An archive pinned from outside it (issue 17, item 7).

The manifest lists the SHA-256 of every file in the archive (stages, runtime, the entry handler
TorchServe imports, model-config.yaml), so its own SHA-256 names the whole archive. An operator
who pins that digest in the worker's environment, ``HETSERVE_ARCHIVE_SHA256`` (one digest, or
``model=digest`` pairs separated by commas), gets a load error for any other archive before
anything from it is read beyond the manifest's bytes. ``hetserve archive`` prints the digest.

What a check inside the worker cannot do: TorchServe imports the archive's entry handler before
any hetserve code runs, so an archive whose entry handler was edited runs that code regardless.
hetserve.pinned_archives checks the pinned archive before TorchServe starts (scripts/serve.sh
and hetserve.tsprocess call it when HETSERVE_ARCHIVE_SHA256 is set; see README).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from handlers.artifact.manifest import MANIFEST_NAME, ManifestError

DIGEST_ENV = "HETSERVE_ARCHIVE_SHA256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def expected_digest(value: str, model_name: str) -> str | None:
    """The digest pinned for ``model_name`` in a ``HETSERVE_ARCHIVE_SHA256`` value, if any."""
    value = value.strip()
    if not value:
        return None
    if "=" not in value:
        digest = value.lower()
    else:
        pairs = dict(item.strip().split("=", 1) for item in value.split(",") if "=" in item)
        if model_name not in pairs:
            return None
        digest = pairs[model_name].strip().lower()
    if not _HEX64.fullmatch(digest):
        raise ManifestError(f"{DIGEST_ENV} for {model_name!r} is not a SHA-256 (64 hex digits)")
    return digest


def check_archive_digest(model_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> None:
    """Raise ManifestError if the operator pinned a digest and the archive is another one."""
    env = os.environ if env is None else env
    pinned = env.get(DIGEST_ENV, "")
    if not pinned.strip():
        return
    raw = (Path(model_dir) / MANIFEST_NAME).read_bytes()
    try:
        name = json.loads(raw).get("model_name", "")
    except (ValueError, AttributeError, RecursionError):
        name = ""
    expected = expected_digest(pinned, str(name))
    if expected is None:
        return
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise ManifestError(
            f"{MANIFEST_NAME} has SHA-256 {actual[:16]}..., {DIGEST_ENV} pins {expected[:16]}...: "
            "this is not the archive the operator pinned"
        )

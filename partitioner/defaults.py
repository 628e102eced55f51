"""Where the shipped defaults live: config.properties, model-config.yaml and log4j2.xml.

The top-level ``config/`` of a clone is the one place people edit them. A wheel carries a copy as
package data (``hetserve/shipped/``, written by setup.py's build step), found through
importlib.resources, so an installed ``hetserve`` needs no clone. A clone always uses its own
``config/``: an editable install elsewhere must not hand a worktree another checkout's files.

This lives in ``partitioner`` because packing an archive needs the default model-config.yaml;
the CLI (``hetserve.tsprocess``) imports it from here. An installed copy
is found by package name through importlib.resources (which loads only ``hetserve/__init__.py``,
a version string), never by importing a ``hetserve`` module.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIG_PROPERTIES = "config.properties"
MODEL_CONFIG = "model-config.yaml"
LOG_CONFIG = "log4j2.xml"
SHIPPED = (CONFIG_PROPERTIES, MODEL_CONFIG, LOG_CONFIG)

_PACKAGE_ROOT = Path(__file__).resolve().parent
_DATA_PACKAGE = "hetserve"  # setup.py copies config/ into hetserve/shipped/ of the wheel
_CHECKOUT_CONFIG = _PACKAGE_ROOT.parent / "config"


def _in_checkout() -> bool:
    # pyproject.toml beside the package tells a source tree from site-packages (where a stray
    # top-level "config" folder of some other distribution could otherwise be picked up).
    return (_PACKAGE_ROOT.parent / "pyproject.toml").is_file() and _CHECKOUT_CONFIG.is_dir()


def config_dir() -> Path:
    """The folder holding the defaults: the clone's ``config/``, else the installed package data."""
    if _in_checkout():
        return _CHECKOUT_CONFIG
    packaged = resources.files(_DATA_PACKAGE) / "shipped"
    # Wheels install unpacked, so the traversable is a real folder TorchServe (Java) can read.
    path = Path(str(packaged))
    if not (path / MODEL_CONFIG).is_file():
        raise FileNotFoundError(
            f"hetserve's default config is missing from {path}: reinstall the package "
            "(the wheel ships config.properties, model-config.yaml and log4j2.xml)")
    return path


def default_file(name: str) -> Path:
    """One shipped default, by file name (one of ``SHIPPED``)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped default named {name!r}; known: {', '.join(SHIPPED)}")
    return config_dir() / name

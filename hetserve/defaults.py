"""The shipped defaults (config.properties, model-config.yaml, log4j2.xml): found by
``partitioner.defaults``, which packing an archive needs too; re-exported for the CLI side."""

from partitioner.defaults import (
    CONFIG_PROPERTIES,
    LOG_CONFIG,
    MODEL_CONFIG,
    SHIPPED,
    config_dir,
    default_file,
)

__all__ = ["CONFIG_PROPERTIES", "LOG_CONFIG", "MODEL_CONFIG", "SHIPPED", "config_dir", "default_file"]

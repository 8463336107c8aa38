"""Value checks on the composed config, so that a bad value fails up front with one line naming the key.

The checks themselves live in :mod:`pipeline.settings` (one typed settings class per section); this module keeps
the old entry point.
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.settings import Settings, check_all


def check_config(cfg: DictConfig) -> Settings:
    """Raise :class:`pipeline.errors.UserError` for the first bad value; return every section's settings."""
    return check_all(cfg)

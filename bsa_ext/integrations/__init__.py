"""Integrations of bsa_ext into model code that calls LongCat's ``flash_attn_bsa_3d``.

``bsa_ext.integrations.longcat`` covers the original ``longcat_video`` package and
FastVideo's LongCat DiT. Nothing here imports those packages: it patches them when
(and if) they are imported.
"""

from . import longcat

__all__ = ["longcat"]

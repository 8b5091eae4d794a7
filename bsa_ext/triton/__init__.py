"""The Triton backend: block selection, forward and backward (SPEC §2-3).

``AVAILABLE_REASON`` is None when Triton imports, else why not. What the kernels
accept (dtypes, head dims, chunk capacities) is stated once, in
``bsa_ext.capabilities.CAPABILITIES``. Head dims that are not powers of two run on
a padded tile. The names ``forward``/``backward`` here are the
functions; their modules stay importable as ``bsa_ext.triton.forward`` etc. via ``from``.
"""

from __future__ import annotations

from typing import Optional

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing at import
    AVAILABLE_REASON: Optional[str] = f"triton is not importable: {exc}"
else:
    AVAILABLE_REASON = None

if AVAILABLE_REASON is None:
    from .backward import backward
    from .forward import forward
    from .select import select_blocks, select_pooled
else:

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"bsa_ext Triton backend unavailable: {AVAILABLE_REASON}")

    select_blocks = select_pooled = forward = backward = _unavailable

__all__ = ["AVAILABLE_REASON", "select_blocks", "select_pooled", "forward", "backward"]

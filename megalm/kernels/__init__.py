"""Gate over the compiled extension ``megalm._C``: every caller has a torch/numpy fallback."""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger("megalm")


@functools.lru_cache(maxsize=None)
def extension():
    """The loaded ``megalm._C`` module, or None (said once in the log) when it is not built or disabled.

    ``MEGALM_DISABLE_EXTENSION=1`` forces the fallbacks, which is how tests compare the two.
    """
    if os.environ.get("MEGALM_DISABLE_EXTENSION") == "1":
        log.info("megalm._C disabled by MEGALM_DISABLE_EXTENSION=1; using PyTorch/numpy fallbacks")
        return None
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        from megalm import _C
    except ImportError as exc:
        log.warning("megalm._C is not built (%s); using PyTorch/numpy fallbacks. "
                    "Build it with: pip install --no-build-isolation -e .", exc)
        return None
    return _C

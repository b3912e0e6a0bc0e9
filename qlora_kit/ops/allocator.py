"""The CUDA caching allocator's settings, applied before CUDA initialises.

``expandable_segments:True`` lets the allocator grow one mapped segment instead of
keeping many fixed-size ones, which removes most fragmentation between steps whose
tensor sizes vary (packed rows of different lengths, tiled loss, offload buffers).  torch
reads the setting once, when CUDA initialises, so it must be in the environment before
the first CUDA call; a value the user set is never overridden.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("qlora_kit")

ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_ENV_NEW = "PYTORCH_ALLOC_CONF"  # torch ≥ 2.9 reads this name first
EXPANDABLE = "expandable_segments:True"


def configure_cuda_allocator() -> bool:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set either variable.

    Returns True when the setting was applied.  A no-op (with a debug line) when CUDA
    is already initialised in this process: the allocator would not see it.
    """
    if os.environ.get(ALLOC_ENV) or os.environ.get(ALLOC_ENV_NEW):
        return False
    import torch

    if torch.cuda.is_initialized():
        log.debug("CUDA already initialised: %s not applied", EXPANDABLE)
        return False
    os.environ[ALLOC_ENV] = EXPANDABLE
    return True

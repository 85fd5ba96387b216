"""Fused ops. Each op module registers a :class:`~mgm_fast.ops._dispatch.FusedOp` whose
backends (reference / triton / cpp / cuda) are chosen with ``impl=`` ("auto" by default)."""

from mgm_fast.ops import attention as _attention  # noqa: F401  (registers the op)
from mgm_fast.ops import batch_norm as _batch_norm  # noqa: F401  (registers the op)
from mgm_fast.ops import conv2d as _conv2d  # noqa: F401  (registers the op)
from mgm_fast.ops import gan_losses as _gan_losses  # noqa: F401  (registers the ops)
from mgm_fast.ops import genblock as _genblock  # noqa: F401  (registers the ops)
from mgm_fast.ops import multitask_loss as _multitask_loss  # noqa: F401  (registers the op)
from mgm_fast.ops import ntxent as _ntxent  # noqa: F401  (registers the ops)
from mgm_fast.ops import simclr_views as _simclr_views  # noqa: F401  (registers the op)
from mgm_fast.ops import spectral_norm as _spectral_norm  # noqa: F401  (registers the op)
from mgm_fast.ops._dispatch import REGISTRY, Backend, BackendUnavailable, FusedOp

__all__ = ["REGISTRY", "Backend", "BackendUnavailable", "FusedOp"]

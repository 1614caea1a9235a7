"""SkySense kernels: one public function per op, a pure-PyTorch reference beside each, and
backends chosen at call time by device, dtype and shape (see ``dispatch``).

Public ops: :func:`attention`, :func:`info_nce`, :func:`prototype_cross_entropy`,
:func:`sinkhorn_knopp`, :func:`normalize_crop_flip`; helper :func:`prototype_center_update`.
"""

from skysense.kernels.attention import attention
from skysense.kernels.data_ops import normalize_crop_flip
from skysense.kernels.dispatch import force_backend, last_backend, poison_outputs
from skysense.kernels.info_nce import info_nce
from skysense.kernels.prototype_loss import prototype_center_update, prototype_cross_entropy
from skysense.kernels.sinkhorn import sinkhorn_knopp

__all__ = [
    "attention",
    "info_nce",
    "prototype_cross_entropy",
    "prototype_center_update",
    "sinkhorn_knopp",
    "normalize_crop_flip",
    "force_backend",
    "last_backend",
    "poison_outputs",
]

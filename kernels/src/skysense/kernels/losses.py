"""The loss ops in one place (each lives in its own module): InfoNCE, the prototype
cross-entropy with its centre update, and Sinkhorn-Knopp, with their references."""

from skysense.kernels.info_nce import info_nce, info_nce_reference
from skysense.kernels.prototype_loss import (
    prototype_center_update,
    prototype_cross_entropy,
    prototype_cross_entropy_reference,
)
from skysense.kernels.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

__all__ = [
    "info_nce",
    "info_nce_reference",
    "prototype_cross_entropy",
    "prototype_cross_entropy_reference",
    "prototype_center_update",
    "sinkhorn_knopp",
    "sinkhorn_knopp_reference",
]

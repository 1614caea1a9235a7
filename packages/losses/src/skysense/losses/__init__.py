"""SkySense pre-training objectives (spec: "Pre-training objectives").

- :class:`SkySenseLoss`: the public entry point; MGCL + CMA weighted, every term by name,
  computed from features (the student/teacher wiring is ``skysense.tasks.training.meta_arch``).
- :class:`DINOHead`: projection head with a weight-normalised prototype layer.
- :class:`TeacherCentering`: the teacher centres.
- :class:`MultiGranularityContrastiveLoss`, :class:`CrossModalAlignment`,
  :class:`GeoContextPrototypeLearning`: the three objectives.

Imports only torch and ``skysense.kernels``.
"""

from skysense.losses.correspondence import match_steps, pixel_correspondence
from skysense.losses.cross_modal_alignment import CrossModalAlignment
from skysense.losses.dino_head import DINOHead
from skysense.losses.gcpl import GeoContextPrototypeLearning
from skysense.losses.mgcl import MultiGranularityContrastiveLoss
from skysense.losses.skysense_loss import SkySenseLoss, SkySenseLossOutput
from skysense.losses.teacher_centering import TeacherCentering

__all__ = [
    "SkySenseLoss",
    "SkySenseLossOutput",
    "DINOHead",
    "TeacherCentering",
    "MultiGranularityContrastiveLoss",
    "CrossModalAlignment",
    "GeoContextPrototypeLearning",
    "pixel_correspondence",
    "match_steps",
]

"""Task heads: classification, UperNet (+ auxiliary FCN), the change head, the simple pyramid
neck for single-resolution features, and Faster R-CNN + FPN for detection."""

from skysense.tasks.downstream.heads.change import ChangeHead, SiameseFusion
from skysense.tasks.downstream.heads.classification import ClassificationHead
from skysense.tasks.downstream.heads.fcn import FCNHead
from skysense.tasks.downstream.heads.neck import SimplePyramid
from skysense.tasks.downstream.heads.upernet import PyramidPooling, UperNetHead


def __getattr__(name: str):
    # The detector pulls in torchvision's detection stack (seconds to import): only on use.
    if name in ("SkySenseFasterRCNN", "SwinFPN"):
        from skysense.tasks.downstream.heads import detection

        return getattr(detection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChangeHead",
    "ClassificationHead",
    "FCNHead",
    "PyramidPooling",
    "SiameseFusion",
    "SimplePyramid",
    "SkySenseFasterRCNN",
    "SwinFPN",
    "UperNetHead",
]

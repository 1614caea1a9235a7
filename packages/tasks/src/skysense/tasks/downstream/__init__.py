"""Downstream tasks of SkySense: fine-tuning, evaluation, large-scene inference and export.

Command line (Hydra overrides; configs in ``skysense/tasks/conf``)::

    skysense finetune task=change_detection data=oscd checkpoint=PRETRAIN.pt compare_random_init=true
    skysense finetune task=multilabel_classification data.modalities=[s2,s1]
    skysense finetune task=detection                      # OSBS_029 trees, Faster R-CNN + FPN
    skysense evaluate task=change_detection weights=runs/finetune/change_detection/pretrained/model.pt
    skysense infer SCENE.tif OUT.tif checkpoint=MODEL.pt [src2=DATE2] [window=...] [block=...]
    skysense export checkpoint=MODEL.pt out=exported/

Tasks (``conf/task``): classification, linear_probe, multilabel_classification,
multimodal_classification, segmentation, multimodal_segmentation, change_detection, detection,
timeseries_classification. Data (``conf/datasets.py``, ``conf/data``): the public datasets of
:mod:`skysense.data.datasets` read from their distributed layouts (``data=<name>
data.root=...``; the README's table lists them), osbs (box CSV/JSON), class_folders,
geotiff_masks, and the data package's embedded / shards manifests.

Modules, one concept each: :mod:`metrics` (tested metric definitions), :mod:`heads` (UperNet,
FCN, change head, pyramid neck, Faster R-CNN + FPN), :mod:`features` (which encoder outputs a
task reads), :mod:`model` (encoder + head), :mod:`optim` (layer-wise lr decay, schedule),
:mod:`checkpoint` (pre-training checkpoints in, fine-tuned model files out), :mod:`datasets`
(label formats and samples), :mod:`data` (config -> data), :mod:`losses`, :mod:`trainer`,
:mod:`evaluation`, :mod:`plots`, :mod:`sliding` (windows and blending), :mod:`scene`
(windowed reading), :mod:`infer`, :mod:`export`, :mod:`run` (finetune / evaluate).
"""

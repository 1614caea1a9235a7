"""The ``data=<name>`` options of the public downstream datasets, as typed structured configs.

Each option is an instance of one of the families below (a dataclass per layout family: the
fields its reader takes, with their types and defaults); :data:`DATASETS` lists them with a
line on the layout each expects. A value of the wrong type (``data.crop=abc``) or an unknown key
is one line at composition, before anything is read. ``skysense finetune --help data=<name>``
prints what each field means (the docstrings of the family's classes) and the option's values.

The pre-training sources (``data=embedded``, the embedded sample, and ``data=shards``, any
``skysense ingest`` output) stay YAML files beside this module (``conf/data/``): they carry the
pre-training views and serve fine-tuning too. Readers: :mod:`skysense.data.datasets`, wired by
:mod:`skysense.tasks.downstream.datasets.public` (a field reaches a reader's constructor when it
is not null and the constructor takes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

_SHARED = "${oc.env:SKYSENSE_SHARED_DATA,../shared/data}"


@dataclass
class DatasetConfig:
    """Every downstream dataset.

    name: the dataset's ``data=`` name.
    root: the folder as the dataset is distributed (``data.root=PATH``).
    augment: random flips and quarter turns of training items (the same for every date and
      for the labels).
    """

    name: str = MISSING
    root: str | None = MISSING
    augment: bool = True


@dataclass
class SplitsConfig(DatasetConfig):
    """Datasets with split files of their own.

    split_file, val_split_file: files of item names (one a line) that override the dataset's
      own training / evaluation split.
    val_split: the split evaluated after fine-tuning and by ``skysense evaluate`` (val or test).
    """

    split_file: str | None = None
    val_split_file: str | None = None
    val_split: str = "val"


@dataclass
class TilesConfig(SplitsConfig):
    """Dense tiles (segmentation, change): random training crops, whole evaluation tiles.

    crop: training crop side in pixels of the label grid (HR pixels a multiple of 32; null: the
      whole tile).
    max_eval: evaluate on at most this many tiles (null: the whole split).
    """

    crop: int | None = 512
    max_eval: int | None = None


@dataclass
class PotsdamConfig(TilesConfig):
    """eroded: the eroded labels (5_Labels_all_noBoundary: boundaries ignored), as the
    benchmark scores."""

    eroded: bool = False


@dataclass
class BoxesConfig(TilesConfig):
    """Detection (task=detection).

    min_visible: a box enters a training crop when at least this fraction of its area is inside.
    """

    min_visible: float = 0.5


@dataclass
class SentinelTilesConfig(TilesConfig):
    """features: the encoder features the tasks use by default (task.features overrides)."""

    features: str = "s2"


@dataclass
class ChangePairsConfig(TilesConfig):
    """HR change pairs.

    features: the encoder features the tasks use by default (task.features overrides).
    label_values: raw label value -> class; other values are an error.
    """

    features: str = "hr"
    label_values: Any = field(default_factory=lambda: {0: 0, 255: 1})


@dataclass
class SeriesTilesConfig(TilesConfig):
    """modalities: the inputs read, among hr, s2, s1 (several: fused features)."""

    modalities: list[str] = field(default_factory=lambda: ["s2"])


@dataclass
class PastisConfig(SeriesTilesConfig):
    """max_steps: dates kept per series, evenly spaced (the paper: 20 S2, 10 S1; null: all).
    s1_orbit: ascending or descending (DATA_S1A / DATA_S1D).
    folds: the folds read (null: 1-3 train, 4 val, 5 test)."""

    max_steps: int | None = 20
    s1_orbit: str = "ascending"
    folds: list[int] | None = None


@dataclass
class DynamicEarthNetConfig(SeriesTilesConfig):
    """modalities: any of hr (Planet), s2, s1.
    months: monthly composites per S2 / S1 series, ending with the label's month.
    s2_bands, s1_bands: band names of the composites in file order (null: band descriptions,
      else for S2 the Level-2A order; S1's 8 channels are undocumented and must be named).
    grid_factor: reference grid pixel in label pixels when S2 / S1 are read (null: from their
      resolution).
    day: day of the month of the Planet image (the labels describe the 1st).
    planet_scale: reflectance x 10000 shown as 255 in the 8-bit RGB the HR encoder takes."""

    months: int = 1
    s2_bands: list[str] | None = None
    s1_bands: list[str] | None = None
    grid_factor: int | None = None
    day: int = 1
    planet_scale: float = 3000.0


@dataclass
class BigEarthNetConfig(SplitsConfig):
    """BigEarthNet patches (multi-label).

    modalities: [s2], [s1] or [s2, s1] (patches lacking one are skipped).
    crop: random training crop side in 10 m pixels (null: the whole 120 x 120 patch).
    """

    modalities: list[str] = field(default_factory=lambda: ["s2"])
    crop: int | None = None


@dataclass
class BigEarthNetV1Config(BigEarthNetConfig):
    """nomenclature: 19 (the BigEarthNet-19 classes) or 43 (the CORINE labels as distributed).
    val_fraction, seed: without the official split files (the shared examples), a seeded split
      of the patches found."""

    nomenclature: int = 19
    val_fraction: float = 0.3
    seed: int = 0


@dataclass
class ImagesConfig(SplitsConfig):
    """Scene classification images.

    size: HR images are resized to size x size pixels (null: as they are).
    ms_size: Sentinel images likewise, in 10 m pixels (null: as they are).
    seed: draws the split where the dataset has none.
    train_fraction: without split files, the share of each class that trains (the rest
      evaluates); val_fraction: the share of each class held out.
    """

    size: int | None = None
    ms_size: int | None = None
    seed: int | None = None
    train_fraction: float | None = None
    val_fraction: float | None = None


@dataclass
class SentinelImagesConfig(ImagesConfig):
    """features: the encoder features the tasks use by default (task.features overrides)."""

    features: str = "s2"


@dataclass
class ClassFoldersConfig(ImagesConfig):
    """root/<class name>/<image> (GeoTIFF, PNG, JPEG).

    features: auto (the images' own modality: hr for RGB, s2 for Sentinel-2 stacks), or a
      feature source.
    val_root: a separate evaluation tree with the same classes (null: hold out val_fraction per
      class).
    sensor: auto (the sensor the images' bands name: band descriptions, else the file's profile:
      3 uint8 bands = hr_rgb, 12 = s2_l2a, 10 = the model's S2 bands), or a sensor name.
    band_order: band names of files without band descriptions, in file order, or eurosat /
      s2_l1c / s2_l2a (13-band files without descriptions need it).
    """

    features: str = "auto"
    val_root: str | None = None
    sensor: str = "auto"
    band_order: Any = None


@dataclass
class OSCDConfig(DatasetConfig):
    """sensor: the product of the images (s2_l1c as distributed).
    label_values: raw mask value -> class (0 no change, 1 change); other values are an error
      (the distributed masks hold 1 / 2; {0: 0, 1: 1} for a copy holding 0 / 1).
    train_cities, val_cities: whole cities to train on and evaluate (sliding windows); null:
      the split files images/train.txt and images/test.txt (val = test).
    crop: training crop side in 10 m pixels (a multiple of the ViT patch).
    change_focus: probability that a training crop is centred on a change pixel.
    val_split: the split evaluated after fine-tuning and by skysense evaluate."""

    sensor: str = "s2_l1c"
    label_values: Any = field(default_factory=lambda: {1: 0, 2: 1})
    train_cities: list[str] | None = None
    val_cities: list[str] | None = None
    crop: int = 32
    change_focus: float = 0.5
    val_split: str = "val"


@dataclass
class SloveniaConfig(DatasetConfig):
    """features: the encoder features the tasks use by default.
    min_pixels: classes are the land-cover codes with at least this many labelled pixels.
    block, train_groups: block x block px blocks, test where (i + j) % 3 == 0; the training
      blocks in train_groups scenes (a validation split holds whole groups out).
    crop: training crop side in pixels."""

    features: str = "s2"
    min_pixels: int = 50
    block: int = 10
    train_groups: int = 4
    crop: int = 32


@dataclass
class GeotiffMasksConfig(DatasetConfig):
    """train_scenes, val_scenes: scenes {name, mask, hr: path, s2: [paths per date], s1: [...]}
      (paths relative to root; give the modalities you have); the mask lies on the grid of the
      task's feature source (HR for features=hr, S2 for fused).
    classes: class names, index = class value after label_values.
    label_values: raw mask value -> class index (null: raw values are the classes); others are
      ignored.
    sensors: sensor of each modality (defaults: hr_rgb, s2_l2a, s1_grd_db).
    crop: training crop side in pixels of the mask's grid."""

    root: str | None = None
    train_scenes: Any = MISSING
    val_scenes: Any = MISSING
    classes: list[str] = MISSING
    label_values: Any = None
    sensors: dict[str, str] = field(default_factory=dict)
    crop: int = 128


@dataclass
class OSBSConfig(DatasetConfig):
    """image: the tile under root. boxes: a box CSV (image_path, xmin, ymin, xmax, ymax, label)
    or JSON (COCO, or records). sensor: the tile's sensor. classes: class names (null: the
    sorted labels of the box file). train_fraction: the tile's left part (this fraction of the
    columns) trains, the rest is held out. crop: training crop side (HR pixels, a multiple of
    32). min_visible: a box enters a crop when at least this fraction of its area is inside."""

    image: str = MISSING
    boxes: str = MISSING
    sensor: str = "hr_rgb"
    classes: list[str] | None = None
    train_fraction: float = 0.67
    crop: int = 128
    min_visible: float = 0.5


# data=<name> -> (its config, what the dataset is and the layout its reader expects).
DATASETS: dict[str, tuple[DatasetConfig, str]] = {
    "aid": (
        ImagesConfig(name="aid", train_fraction=0.2, seed=0, size=224),
        (
            "AID (Xia et al. 2017): AID/<Class>/<class>_<n>.jpg, 600 x 600 px RGB, 30 classes. No "
            "official split: train_fraction of each class trains (the paper: 20 % or 50 %), the "
            "rest evaluates; split_file / val_split_file (file names, one a line) override."
        ),
    ),
    "resisc45": (
        ImagesConfig(name="resisc45", train_fraction=0.2, seed=0, size=256),
        (
            "NWPU-RESISC45 (Cheng et al. 2017): NWPU-RESISC45/<class>/<class>_<nnn>.jpg, 256 x 256 "
            "px RGB, 45 classes. Splits: resisc45-{train,val,test}.txt under root where present, "
            "else train_fraction per class (the paper: 10 % or 20 %)."
        ),
    ),
    "eurosat_ms": (
        SentinelImagesConfig(name="eurosat_ms", val_fraction=0.2, seed=0),
        (
            "EuroSAT multispectral (Helber et al. 2019): EuroSAT_MS/<Class>/<Class>_<n>.tif, 64 x "
            "64 px Sentinel-2 L1C, 13 uint16 bands stored B01..B12 then B8A (mapped by name onto "
            "the model's 10 bands), 10 classes. Splits: eurosat-{train,val,test}.txt under root "
            "where present, else a seeded per-class split."
        ),
    ),
    "eurosat_rgb": (
        ImagesConfig(name="eurosat_rgb", val_fraction=0.2, seed=0, size=64),
        (
            "EuroSAT RGB: 2750/<Class>/<Class>_<n>.jpg, 64 x 64 px RGB at 10 m, 10 classes; the HR "
            "encoder."
        ),
    ),
    "fmow_s2": (
        SentinelImagesConfig(name="fmow_s2", size=64),
        (
            "fMoW-Sentinel (fMoW-S2): {train,val,test_gt}.csv + "
            "<split>/<category>/<category>_<loc>/*.tif, 13-band Sentinel-2 L1C images of 62 "
            "classes."
        ),
    ),
    "class_folders": (
        ClassFoldersConfig(name="class_folders", val_fraction=0.2, seed=0, size=128),
        (
            "Scene classification from class folders: root/<class name>/<image> (GeoTIFF, PNG, "
            "JPEG) (skysense.data.datasets.classification.ClassFolders)."
        ),
    ),
    "bigearthnet": (
        BigEarthNetV1Config(name="bigearthnet", root=_SHARED + "/bigearthnet"),
        (
            "BigEarthNet v1 (skysense.data.datasets.bigearthnet.BigEarthNet): Sentinel-2 L2A "
            "per-band GeoTIFFs (10/20/60 m, resampled to 10 m), Sentinel-1 VV/VH, 43 CORINE labels "
            "per patch in *_labels_metadata.json, the official split in train.csv / val.csv / "
            "test.csv under root."
        ),
    ),
    "bigearthnet_v2": (
        BigEarthNetConfig(name="bigearthnet_v2"),
        (
            "BigEarthNet v2 / reBEN: metadata.parquet (patch_id, 19-class labels, split train / "
            "validation / test, s1_name), BigEarthNet-S2/<tile>/<patch_id>/..., "
            "BigEarthNet-S1/<product>/<s1_name>/..."
        ),
    ),
    "isaid": (
        TilesConfig(name="isaid"),
        (
            "iSAID: {train,val}/images/P<n>.png + "
            "{train,val}/Semantic_masks/images/P<n>_instance_color_RGB.png, 15 classes + background"
            " coded by colour."
        ),
    ),
    "potsdam": (
        PotsdamConfig(name="potsdam"),
        (
            "ISPRS Potsdam: 2_Ortho_RGB/top_potsdam_<a>_<b>_RGB.tif + "
            "5_Labels_all/top_potsdam_<a>_<b>_label.tif (colour-coded: impervious white, building "
            "blue, low vegetation cyan, tree green, car yellow, clutter red). Splits: the "
            "benchmark's 24 training / 14 test tiles (val = test)."
        ),
    ),
    "hls_burn_scars": (
        SentinelTilesConfig(name="hls_burn_scars", crop=64),
        (
            "HLS Burn Scars: "
            "{training,validation}/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4_merged.tif (B02 B03"
            " B04 B8A B11 B12 reflectance; B5-B8, absent, are filled with the mean) + .mask.tif (1 "
            "burn scar, 0 not, -1 ignored)."
        ),
    ),
    "mados": (
        SentinelTilesConfig(name="mados", crop=64),
        (
            "MADOS: Scene_<k>/{10,20,60}/Scene_<k>_L2R_rhorc_<nm>_<crop>.tif (bands named by "
            "wavelength), Scene_<k>/10/Scene_<k>_L2R_cl_<crop>.tif (0 unlabelled, 1..15), "
            "splits/<split>_X.txt."
        ),
    ),
    "sen1floods11": (
        SeriesTilesConfig(name="sen1floods11", modalities=["s2", "s1"], crop=64),
        (
            "Sen1Floods11 hand-labelled chips: "
            "v1.1/data/flood_events/HandLabeled/{S2Hand,S1Hand,LabelHand}/ and "
            "v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv. Labels: -1 ignored, 0"
            " no water, 1 water. Inputs [s2], [s1] or [s2, s1] (fused features)."
        ),
    ),
    "pastis": (
        PastisConfig(name="pastis", crop=64),
        (
            "PASTIS / PASTIS-R: metadata.geojson, DATA_S2/S2_<id>.npy, DATA_S1A/, DATA_S1D/, "
            "ANNOTATIONS/TARGET_<id>.npy (semantic classes 0-18, 19 void ignored). Folds 1-3 train,"
            " 4 val, 5 test. Inputs [s2], [s1] or [s2, s1] (fused features)."
        ),
    ),
    "dynamicearthnet": (
        DynamicEarthNetConfig(name="dynamicearthnet", modalities=["hr"]),
        (
            "DynamicEarthNet: dynnet_training_splits/{train,val,test}.txt ('<planet dir> <label> "
            "<YYYY-MM>'), planet/<zone>/<aoi>/<cube>/PF-SR/<YYYY-MM-DD>.tif (B G R NIR), "
            "sentinel2/<cube>/ and sentinel1/<cube>/ monthly composites, 7-band one-hot monthly "
            "labels. Planet (Dyna.-Pla): task=segmentation; S2 series (Dyna.-S2): "
            "task=multimodal_segmentation data.modalities=[s2]; Planet + S2 + S1 (Dyna.-MM): "
            "data.modalities=[hr,s2,s1] data.s1_bands=[...]."
        ),
    ),
    "levir_cd": (
        ChangePairsConfig(name="levir_cd", crop=256),
        (
            "LEVIR-CD: {train,val,test}/{A,B,label}/<name>.png (1024 px RGB pairs at 0.5 m, labels "
            "0 / 255); also root/{A,B,label} + root/list/<split>.txt."
        ),
    ),
    "whu_cd": (
        ChangePairsConfig(name="whu_cd", crop=256),
        (
            "WHU-CD (cut into tiles): {A,B,label}/<name>.png + list/{train,val,test}.txt, 0.3 m "
            "aerial RGB pairs, labels 0 / 255."
        ),
    ),
    "oscd": (
        OSCDConfig(
            name="oscd",
            root=_SHARED + "/oscd",
            train_cities=["aguasclaras", "bercy", "bordeaux", "nantes"],
            val_cities=["paris", "rennes"],
        ),
        (
            "Onera Satellite Change Detection (skysense.data.datasets.oscd.OSCD): Sentinel-2 L1C "
            "pairs (per-band GeoTIFFs, EPSG:4326; date 2 resampled onto date 1's grid) with change "
            "masks for the labelled cities (labels/<city>/cm/<city>-cm.tif)."
        ),
    ),
    "eolearn_slovenia": (
        SloveniaConfig(name="eolearn_slovenia", root=_SHARED + "/eolearn_slovenia"),
        (
            "The eo-learn Slovenia example patch (../shared/data/eolearn_slovenia): 5 Sentinel-2 "
            "L1C dates of a 101 x 100 px place with its land-cover mask, as series segmentation for"
            " the benchmark's fine-tuning protocols (skysense.tasks.benchmark.slovenia: the probes'"
            " block split; dates not recorded, evenly spread days of year)."
        ),
    ),
    "dior": (
        BoxesConfig(name="dior"),
        (
            "DIOR: JPEGImages-{trainval,test}/<id>.jpg, Annotations/Horizontal Bounding "
            "Boxes/<id>.xml (VOC), ImageSets/Main/{train,val,test}.txt; 20 classes, 800 x 800 px. "
            "Run with task=detection."
        ),
    ),
    "dior_r": (
        BoxesConfig(name="dior_r"),
        (
            "DIOR-R: the DIOR images with Annotations/Oriented Bounding Boxes/<id>.xml (robndbox "
            "corners); task=detection trains the rotated-box branch on them (task.head.oriented: "
            "auto) and scores rotated-box mAP50 (skysense.data.datasets.oriented.rotated_map)."
        ),
    ),
    "fair1m": (
        BoxesConfig(name="fair1m"),
        (
            "FAIR1M: <train|validation|test>/[part<k>/]images/<n>.tif + labelXml/<n>.xml, 37 "
            "classes, oriented boxes: task=detection trains the rotated-box branch on them "
            "(task.head.oriented: auto) and scores rotated-box mAP50."
        ),
    ),
    "osbs": (
        OSBSConfig(
            name="osbs", root=_SHARED + "/hr_rgb", image="OSBS_029.tif", boxes="OSBS_029.csv"
        ),
        (
            "NEON airborne RGB tile OSBS_029 (0.1 m, EPSG:32617) with its tree boxes (DeepForest's "
            "CSV). The tile's left part (train_fraction of the columns) trains; the rest is held "
            "out."
        ),
    ),
    "geotiff_masks": (
        GeotiffMasksConfig(name="geotiff_masks"),
        (
            "Segmentation scenes: GeoTIFF inputs with label masks aligned to them. Each scene is "
            "{name, mask, hr: path, s2: [paths per date], s1: [paths per date]} (paths relative to "
            "root; give the modalities you have); the mask lies on the grid of the task's feature "
            "source (HR for features=hr, S2 for fused). See "
            "skysense.tasks.downstream.datasets.segmentation."
        ),
    ),
}

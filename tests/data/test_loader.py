"""build_loader: the batch contract, DALI == torch, seeded order, exact resume, rank sharding."""

from __future__ import annotations

import itertools

import pytest
import torch

from skysense.data import build_loader
from skysense.data.batch import BatchError, validate_batch
from skysense.data.loader import dali_available
from skysense.data.manifest import Manifest, ManifestError

pytestmark = pytest.mark.unit

VIEWS = {"crop": 16, "max_steps": {"s2": 6, "s1": 4}}


def _flat(batch) -> dict[str, torch.Tensor]:
    if "view1" in batch:
        return {f"{v}.{k}": t for v in ("view1", "view2") for k, t in batch[v].items()}
    return dict(batch)


def assert_batches_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert torch.equal(fa[k], fb[k]), (
            f"{k} differs: max {(fa[k].double() - fb[k].double()).abs().max()}"
        )


def test_plain_batch_contract(embedded_manifest):
    loader = build_loader(embedded_manifest, "train", 8, "torch")
    assert len(loader) == 5  # 40 train samples, drop_last False
    batch = next(iter(loader))
    validate_batch(batch, views=False)
    B = 8
    assert batch["hr"].shape == (B, 3, 192, 192) and batch["hr"].dtype == torch.float32
    T2, T1 = batch["s2"].shape[1], batch["s1"].shape[1]
    assert batch["s2"].shape == (B, T2, 10, 24, 24) and 6 <= T2 <= 12
    assert batch["s1"].shape == (B, T1, 2, 24, 24) and 3 <= T1 <= 8
    assert batch["s2_doy"].dtype == torch.int64 and batch["s2_valid"].dtype == torch.bool
    assert batch["s2_pixel_valid"].shape == (B, T2, 24, 24)
    assert batch["label"].dtype == torch.int64 and batch["label"].max() < 5
    lat, lon = batch["latlon"][:, 0], batch["latlon"][:, 1]
    assert ((lat > 42) & (lat < 45) & (lon > 0) & (lon < 3)).all()  # UTM 31N, southern France
    # padded steps: no date, not valid, zeros
    pad = batch["s2_doy"] == 0
    assert not batch["s2_valid"][pad].any() and (batch["s2"][pad] == 0).all()
    # normalised with the spec statistics: valid pixels of a cloud-free step are O(1)
    x = batch["s2"][batch["s2_pixel_valid"].unsqueeze(2).expand_as(batch["s2"])]
    assert -3 < float(x.mean()) < 3 and float(x.std()) < 5
    assert "view_affine" not in batch and "s2_index" not in batch


def test_views_batch_contract(embedded_manifest):
    loader = build_loader(embedded_manifest, "train", 4, "torch", views=True, view_config=VIEWS)
    assert len(loader) == 10
    batch = next(iter(loader))
    validate_batch(batch, views=True)
    v1, v2 = batch["view1"], batch["view2"]
    assert v1["hr"].shape == (4, 3, 128, 128) and v1["s2"].shape[2:] == (10, 16, 16)
    assert v1["s2"].shape[1] <= 6 and v1["s1"].shape[1] <= 4
    assert v1["view_affine"].shape == (4, 2, 3) and v1["s2_index"].dtype == torch.int64
    assert torch.equal(v1["sample_id"], v2["sample_id"])


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
@pytest.mark.parametrize("views", [False, True])
def test_dali_and_torch_give_identical_batches(embedded_manifest, views):
    # plain: batches of 7 leave a short last batch (40 = 5 x 7 + 5); views drop it
    bs = 8 if views else 7
    kw = dict(views=views, view_config=VIEWS, seed=11, epochs=1)
    torch_batches = list(build_loader(embedded_manifest, "train", bs, "torch", **kw))
    dali = build_loader(embedded_manifest, "train", bs, "dali", num_workers=2, **kw)
    assert dali.backend == "dali"
    dali_batches = list(dali)
    assert len(torch_batches) == len(dali_batches) == (5 if views else 6)
    for a, b in zip(torch_batches, dali_batches):
        assert_batches_equal(a, b)
    assert len(list(dali)) == len(dali_batches)  # the pipeline serves a second epoch too


def test_torch_workers_give_the_same_batches(embedded_manifest):
    kw = dict(views=True, view_config=VIEWS, seed=2)
    a = list(build_loader(embedded_manifest, "train", 8, "torch", num_workers=0, **kw))
    b = list(build_loader(embedded_manifest, "train", 8, "torch", num_workers=2, **kw))
    for x, y in zip(a, b, strict=True):
        assert_batches_equal(x, y)


def test_seeded_order_reshuffled_per_epoch(embedded_manifest):
    def ids(seed, epochs=2):
        return [
            b["sample_id"].tolist()
            for b in build_loader(
                embedded_manifest, "train", 8, "torch", seed=seed, epochs=epochs, modalities=["s1"]
            )
        ]

    a, b, c = ids(0), ids(0), ids(1)
    assert a == b and a != c
    e0 = sorted(sum(a[:5], []))
    e1 = sorted(sum(a[5:], []))
    assert e0 == e1 and len(set(e0)) == 40  # each epoch: every train sample once
    assert sum(a[:5], []) != sum(a[5:], [])  # reshuffled
    val = [
        b["sample_id"].tolist()
        for b in build_loader(embedded_manifest, "val", 8, "torch", modalities=["s1"])
    ]
    assert sum(val, []) == sorted(sum(val, []))  # val: no shuffle by default


def test_resume_at_start_batch_is_exact(embedded_manifest):
    kw = dict(views=True, view_config=VIEWS, seed=4, epochs=None)
    full = list(itertools.islice(build_loader(embedded_manifest, "train", 8, "torch", **kw), 8))
    resumed = list(
        itertools.islice(
            build_loader(embedded_manifest, "train", 8, "torch", start_batch=5, **kw), 3
        )
    )
    for a, b in zip(full[5:], resumed, strict=True):  # crosses into epoch 1 (5 batches/epoch)
        assert_batches_equal(a, b)


@pytest.mark.parametrize("views", [False, True])
def test_ranks_concatenate_to_the_global_batch(embedded_manifest, views):
    kw = dict(views=views, view_config=VIEWS, seed=9, epochs=1)
    one = list(build_loader(embedded_manifest, "train", 8, "torch", **kw))
    r0 = list(build_loader(embedded_manifest, "train", 4, "torch", rank=0, world_size=2, **kw))
    r1 = list(build_loader(embedded_manifest, "train", 4, "torch", rank=1, world_size=2, **kw))
    assert len(one) == len(r0) == len(r1)
    for g, a, b in zip(one, r0, r1):
        fa, fb = _flat(a), _flat(b)
        cat = {k: torch.cat([fa[k], fb[k]]) for k in fa}
        assert_batches_equal(_flat(g), cat)


def test_endless_iteration_and_modalities(embedded_manifest):
    loader = build_loader(embedded_manifest, "val", 4, "torch", epochs=None, modalities=["s2"])
    with pytest.raises(TypeError, match="endless"):
        len(loader)
    batches = list(itertools.islice(loader, 7))  # 8 val samples: 2 batches per epoch
    assert len(batches) == 7
    assert set(batches[0]) == {
        "s2",
        "s2_doy",
        "s2_valid",
        "s2_pixel_valid",
        "latlon",
        "label",
        "sample_id",
    }


def test_loader_errors(embedded_manifest, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        build_loader(embedded_manifest, "train", 4, "jax")
    with pytest.raises(ManifestError, match="no sample in split 'test'"):
        build_loader(embedded_manifest, "test", 4, "torch")
    with pytest.raises(ManifestError, match="no manifest"):
        build_loader(tmp_path / "nowhere", "train", 4, "torch")
    with pytest.raises(ValueError, match="not in manifest"):
        build_loader(embedded_manifest, "train", 4, "torch", modalities=["sar"])
    with pytest.raises(ValueError, match="rank 2"):
        build_loader(embedded_manifest, "train", 4, "torch", rank=2, world_size=2)
    m = Manifest(embedded_manifest)
    assert m.classes == ["cropland_spring", "cropland_summer", "forest", "grassland", "urban"]


def test_validate_batch_names_the_culprit(embedded_manifest):
    batch = next(iter(build_loader(embedded_manifest, "train", 2, "torch")))
    bad = dict(batch, s2=batch["s2"][:, :, :9])
    with pytest.raises(BatchError, match=r"batch\['s2'\]: shape \(2, \d+, 9, 24, 24\)"):
        validate_batch(bad)
    bad = dict(batch, s2_doy=batch["s2_doy"].int())
    with pytest.raises(BatchError, match=r"batch\['s2_doy'\]: dtype torch.int32"):
        validate_batch(bad)
    bad = dict(batch, s1_valid=batch["s1_valid"][:, :1])
    with pytest.raises(BatchError, match=r"batch\['s1_valid'\]: shape"):
        validate_batch(bad)
    bad = {k: v for k, v in batch.items() if k != "s2_doy"}
    with pytest.raises(BatchError, match=r"s2_doy.*missing"):
        validate_batch(bad)
    with pytest.raises(BatchError, match="none of the modalities"):
        validate_batch({"latlon": batch["latlon"]})
    with pytest.raises(BatchError, match="views batch"):
        validate_batch(batch, views=True)
    bad = dict(batch, latlon=batch["latlon"].double())
    with pytest.raises(BatchError, match="latlon"):
        validate_batch(bad)


def test_resolve_manifest_from_the_data_configs(embedded_manifest):
    from skysense.data import resolve_manifest
    from skysense.tasks.cli import compose

    cfg = compose("pretrain", [f"data.root={embedded_manifest.parent}"]).data
    assert resolve_manifest(cfg) == embedded_manifest  # already built: returned as it is
    loader = build_loader(
        resolve_manifest(cfg), cfg.split, 4, "torch", views=True, view_config=cfg.views
    )
    assert loader.assembler.view_config.max_steps == {"s2": 20, "s1": 10}
    cfg = compose("pretrain", ["data=shards", "data.manifest=/x/manifest.sqlite"]).data
    assert str(resolve_manifest(cfg)) == "/x/manifest.sqlite"
    with pytest.raises(ValueError, match="no `manifest`"):
        resolve_manifest({"name": "shards"})

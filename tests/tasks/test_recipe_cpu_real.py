"""The cpu_real pre-training recipe: it composes, it validates against a missing ingest by naming
the manifest, and its staging finds the real samples of ../shared/data (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skysense.tasks import stage_shared
from skysense.tasks.cli import compose
from skysense.tasks.errors import ConfigError

pytestmark = pytest.mark.unit


def test_recipe_composes_over_the_pretrain_defaults(tmp_path, monkeypatch):
    from skysense.tasks.pretrain import validate

    monkeypatch.setenv("SKYSENSE_REAL_DATA", str(tmp_path / "real"))
    cfg = compose("pretrain", ["recipe=cpu_real"])
    base = compose("pretrain", [])
    assert cfg.data.name == "shards" and base.data.name == "embedded"
    assert cfg.data.manifest == str(tmp_path / "real" / "shards" / "manifest.sqlite")
    assert cfg.run_dir == "runs/pretrain-real" != base.run_dir
    assert cfg.trainer.linear_probe is False
    # What the recipe leaves alone is the default (the same model preset as make pretrain).
    assert cfg.model.preset == base.model.preset == "tiny"
    # A later override still wins over the recipe.
    assert compose("pretrain", ["recipe=cpu_real", "trainer.max_steps=7"]).trainer.max_steps == 7
    # Not ingested yet: validation names the manifest before any work.
    with pytest.raises(ConfigError, match="data.manifest"):
        validate(cfg)


def test_plan_without_shared_data_gives_reasons(tmp_path, capsys):
    sources = stage_shared.plan(tmp_path / "absent")
    assert [s.name for s in sources] == [n for _, n in stage_shared.SOURCES]
    assert all(s.reason and "does not exist" in s.reason and not s.files for s in sources)
    assert stage_shared.main([str(tmp_path / "src"), "--root", str(tmp_path / "absent")]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "src").exists()


@pytest.mark.integration
def test_stage_finds_the_shared_samples(shared_data: Path, tmp_path):
    import rasterio

    sources = {s.name: s for s in stage_shared.plan(shared_data)}
    assert all(s.reason is None for s in sources.values()), {
        n: s.reason for n, s in sources.items()
    }
    oscd = sources["oscd"].files
    cities = {f.relative_to(sources["oscd"].path).parts[0] for f in oscd}
    assert len(cities) == 10
    assert not any("labels" in f.parts or f.name.endswith("-cm.tif") for f in oscd)
    assert sum(f.name == "dates.txt" for f in oscd) == 10

    src = tmp_path / "src"
    stage_shared.stage(src, shared_data)
    tifs = sorted((src / "slovenia").glob("*.tif"))
    assert [t.name[-12:-4] for t in tifs] == list(stage_shared.SLOVENIA_DATES)
    with rasterio.open(tifs[0]) as ds:
        assert ds.count == 13 and ds.dtypes[0] == "uint16"
        assert ds.crs.to_epsg() == 32633 and ds.descriptions[10] == "B10"
        assert ds.res == pytest.approx((10.0, 10.0), abs=0.1)
    links = sorted(p for p in (src / "oscd").rglob("*") if p.is_symlink())
    assert len(links) == len(oscd) and all(p.resolve().is_file() for p in links)
    mtime = tifs[0].stat().st_mtime_ns
    stage_shared.stage(src, shared_data)  # idempotent: nothing rewritten
    assert tifs[0].stat().st_mtime_ns == mtime


def test_dense_tokens_keep_the_valid_steps_of_samples_that_hold_the_modality():
    import torch

    from skysense.tasks.training.health import dense_tokens, rankme

    tok = torch.randn(3, 2, 5, 2, 4)  # (B, T, C, h, w)
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    rows = dense_tokens({"tokens_s2": tok, "valid_s2": valid}, "s2")
    assert rows.shape == (2 * 2 * 4, 5)  # the sample without S2 is left out
    assert torch.allclose(rows[:8], tok[0, 0].permute(1, 2, 0).reshape(8, 5))
    assert torch.allclose(rows[8:], tok[2].mean(0).permute(1, 2, 0).reshape(8, 5))
    assert dense_tokens({}, "s2") is None
    # Rows along one direction have an effective rank of about 1, spread rows more.
    assert rankme(torch.randn(16, 1) * torch.randn(1, 5)) < 1.5 < rankme(rows)

"""The structured config groups: ``model`` (five options, no YAML, built from one table of head
sizes beside the encoder presets; every command composes them and the loss reads the heads) and
the ``data`` group's downstream datasets (typed options of conf/datasets.py)."""

from __future__ import annotations

from importlib import resources

import pytest
from omegaconf import OmegaConf

from skysense.encoders import PRESETS
from skysense.tasks.cli import compose, config_groups, main
from skysense.tasks.conf.datasets import DATASETS
from skysense.tasks.conf.schema import HEAD_SIZES
from skysense.tasks.errors import ConfigError

pytestmark = pytest.mark.unit


def test_one_head_row_per_encoder_preset_and_no_model_yaml():
    assert list(HEAD_SIZES) == list(PRESETS) == ["tiny", "small", "base", "large", "huge"]
    conf = resources.files("skysense.tasks.conf")
    assert not (conf / "model").is_dir() or not any(
        e.name.endswith(".yaml") for e in (conf / "model").iterdir()
    )
    assert config_groups("pretrain")["model"] == sorted(PRESETS)


@pytest.mark.parametrize("preset", list(HEAD_SIZES))
def test_model_option_composes_with_its_heads(preset):
    cfg = compose("pretrain", [f"model={preset}"])
    heads = HEAD_SIZES[preset]
    assert cfg.model.preset == preset and cfg.model.checkpointing is False
    assert dict(cfg.model.overrides) == {}
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    assert (loss["n_prototypes"], loss["head_hidden_dim"], loss["head_bottleneck_dim"]) == (
        heads.n_prototypes,
        heads.hidden_dim,
        heads.bottleneck_dim,
    )


def test_head_sizes_are_the_ones_the_yaml_held():
    # The values the deleted conf/model/*.yaml held (behaviour unchanged by the move).
    sizes = {k: (v.n_prototypes, v.hidden_dim, v.bottleneck_dim) for k, v in HEAD_SIZES.items()}
    assert sizes == {
        "tiny": (1024, 512, 128),
        "small": (16384, 2048, 256),
        "base": (65536, 2048, 256),
        "large": (65536, 2048, 256),
        "huge": (65536, 2048, 256),
    }


@pytest.mark.parametrize("command", ["pretrain", "finetune", "export", "convert", "benchmark"])
def test_model_overrides_reach_every_command(command):
    cfg = compose(
        command,
        ["model=small", "+model.overrides.fusion_depth=2", "model.checkpointing=true"],
    )
    assert cfg.model.preset == "small" and cfg.model.checkpointing is True
    assert OmegaConf.to_container(cfg.model.overrides) == {"fusion_depth": 2}
    assert cfg.model.heads.n_prototypes == 16384


def test_head_override_reaches_the_loss_and_types_are_checked():
    cfg = compose("pretrain", ["model.heads.n_prototypes=4096"])
    assert OmegaConf.to_container(cfg.loss, resolve=True)["n_prototypes"] == 4096
    with pytest.raises(ConfigError, match="model.heads.n_prototypes"):
        compose("pretrain", ["model.heads.n_prototypes=many"])
    with pytest.raises(ConfigError):
        compose("pretrain", ["model=gigantic"])


def test_help_describes_the_model_keys(capsys):
    assert main(["pretrain", "--help", "model=huge"]) == 0
    out = capsys.readouterr().out
    assert "model: base, huge, large, small, tiny" in out
    assert "keys of model=huge" in out and "activation checkpointing" in out
    assert "n_prototypes: 65536" in out


def test_recipe_paper_composes_with_the_papers_numbers():
    from skysense.tasks.pretrain import validate

    cfg = compose("pretrain", ["recipe=paper"])
    base = compose("pretrain", [])
    assert cfg.model.preset == "huge" and cfg.model.heads.n_prototypes == 65536
    assert (cfg.trainer.batch_size, cfg.trainer.max_steps) == (240, 875_000)
    assert cfg.trainer.precision == "bf16" and cfg.optim.name == "adamw"
    assert cfg.optim.grad_clip == 5.0 and cfg.optim.lr == 2.0e-4
    assert cfg.optim.lr_scaling == "none" and 0.0 < cfg.optim.layer_decay < 1.0
    # Pixel-level MGCL over every matched pair; the default keeps its cost cap.
    assert cfg.loss.max_pixel_pairs is None and base.loss.max_pixel_pairs is not None
    assert OmegaConf.to_container(cfg.loss, resolve=True)["n_prototypes"] == 65536
    assert cfg.data.name == "shards"
    # A later override still wins over the recipe; the shards must be named before any work.
    assert compose("pretrain", ["recipe=paper", "trainer.max_steps=7"]).trainer.max_steps == 7
    with pytest.raises(ConfigError, match="data.manifest"):
        validate(cfg)


# --- the data group's downstream datasets: typed structured options ---------------------------


def test_every_dataset_option_is_offered_and_composes_typed():
    """Every downstream dataset is a ``data=`` option (beside the YAML pre-training sources);
    each composes under finetune with its own name and typed fields."""
    groups = config_groups("finetune")["data"]
    assert set(DATASETS) | {"embedded", "shards"} == set(groups)
    conf = resources.files("skysense.tasks.conf") / "data"
    assert sorted(e.name for e in conf.iterdir() if e.name.endswith(".yaml")) == [
        "embedded.yaml",
        "shards.yaml",
    ]
    for name in DATASETS:
        cfg = compose("finetune", [f"data={name}"])
        assert cfg.data.name == name
    # the crop of a tile dataset is an int: a string is refused at composition, naming the field
    with pytest.raises(ConfigError) as e:
        compose("finetune", ["task=segmentation", "data=isaid", "data.crop=abc"])
    assert e.value.field == "data.crop"
    with pytest.raises(ConfigError) as e:
        compose("finetune", ["data=oscd", "data.no_such_key=1"])
    assert "no_such_key" in str(e.value)


def test_a_dataset_keeps_its_own_features_and_the_task_default_otherwise():
    """``task.features`` follows ``data.features`` where the dataset names one (EuroSAT MS: s2)
    and the task's default where it does not (iSAID under segmentation: hr; OSCD under change
    detection: s2)."""
    pick = {
        ("classification", "eurosat_ms"): "s2",
        ("segmentation", "isaid"): "hr",
        ("change_detection", "oscd"): "s2",
        ("change_detection", "levir_cd"): "hr",
    }
    for (task, data), want in pick.items():
        assert compose("finetune", [f"task={task}", f"data={data}"]).task.features == want


def test_help_describes_a_datasets_keys(capsys):
    assert main(["finetune", "--help", "task=change_detection", "data=oscd"]) == 0
    out = capsys.readouterr().out
    assert "keys of data=oscd" in out
    assert "Onera Satellite Change Detection" in out and "change_focus: probability" in out

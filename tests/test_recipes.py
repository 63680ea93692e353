"""Every recipe in configs/ loads, validates and resolves to runnable phases on a model that builds; every study
file in configs/studies/ loads with each of its arms checked the same way."""

from pathlib import Path

import pytest

from bench.study import load_study
from models import build_model, split_points
from train.config import load_config
from train.phases import run_phases

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yml") if not {"variants", "studies"} & set(p.parts))
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_resolves(recipe):
    cfg = load_config(str(recipe))
    phases = run_phases(cfg)
    assert phases[0].name == "train" and all(p.resolution >= 8 for p in phases)
    if cfg.finetune.enabled:
        names = split_points(build_model(cfg.model))
        assert phases[1].first_trainable in names


@pytest.mark.parametrize("study_file", STUDIES, ids=lambda p: p.name)
def test_study_file_resolves(study_file, tmp_path):
    study = load_study(study_file, tmp_path / "study")  # checks every arm's config and phases
    assert study.arms and study.test_resolution >= 8
    assert all(arm.config.is_file() for arm in study.arms)


def test_v2_recipes_follow_their_papers():
    progressive = run_phases(load_config(str(ROOT / "configs/efficientnetv2-s-progressive.yml")))[0]
    assert [s.resolution for s in progressive.stages] == [128, 185, 243, 300]
    assert [s.randaugment for s in progressive.stages] == pytest.approx([5, 25 / 3, 35 / 3, 15])
    assert progressive.val_resolutions == [384]
    train, tune = run_phases(load_config(str(ROOT / "configs/efficientnetv2-s-g16-ln-pn-lowres.yml")))
    assert (train.resolution, tune.resolution) == (256, 384)
    assert train.resolution % 32 == tune.resolution % 32

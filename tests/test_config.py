"""Config loader: inheritance, overrides, and a clear message for every kind of mistake."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "parent.yml", "model:\n  group_dim: 16\n  norm: layer\ntrain:\n  epochs: 3\n")
    child = write(tmp_path, "child.yml", "base: parent.yml\nmodel:\n  proxy_norm: true\n")
    cfg = load_config(child, ["train.epochs=7", "train.resolution=160", "model.num_classes=10"])
    assert (cfg.model.group_dim, cfg.model.norm, cfg.model.proxy_norm) == (16, "layer", True)
    assert (cfg.train.epochs, cfg.train.resolution, cfg.model.num_classes) == (7, 160, 10)
    assert cfg.name == "child"


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, "sci.yml", "optimizer:\n  weight_decay: 1e-5\n"), ["optimizer.lr=2e-3"])
    assert cfg.optimizer.weight_decay == 1e-5 and cfg.optimizer.lr == 2e-3


def test_only_true_and_false_are_booleans(tmp_path):
    cfg = load_config(write(tmp_path, "on.yml", "name: on\nmodel:\n  proxy_norm: true\n  norm: layer\n"))
    assert cfg.name == "on" and cfg.model.proxy_norm is True
    with pytest.raises(ConfigError, match="model.proxy_norm: 'yes' is not true or false"):
        load_config(None, ["model.proxy_norm=yes"])


def test_numeric_looking_choices_accept_bare_numbers():
    assert load_config(None, ["precision.compute=16.32"]).precision.compute == "16.32"


def test_round_trip_through_plain_data():
    cfg = load_config(str(ROOT / "configs/models/efficientnet-b0-g16-ln-pn.yml"))
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("override, expected", [
    ("model.group_dimm=16", "unknown key 'model.group_dimm'; did you mean 'model.group_dim'?"),
    ("modle.norm=layer", "unknown key 'modle'; did you mean 'model'?"),
    ("model.group_dim=sixteen", "model.group_dim: 'sixteen' is not an integer"),
    ("model.norm=instance", "model.norm: 'instance' is not one of 'batch', 'group', 'layer'"),
    ("model.proxy_norm=yes please", "model.proxy_norm: 'yes please' is not true or false"),
    ("model.group_dim=0", "model.group_dim: 0 is below the minimum 1"),
    ("model.proxy_norm=true", "model.proxy_norm: true needs model.norm group or layer, not batch"),
    ("model.norm_impl=fast", "model.norm_impl: 'fast' is not one of 'auto', 'modules', 'function', 'triton'"),
    ("model.fused_norm=on", "model.fused_norm is now model.norm_impl: one of 'auto', 'modules', 'function', "
                            "'triton'"),
    ("model.norm_autograd=modules", "model.norm_autograd is now model.norm_impl: one of 'auto', 'modules', "
                                    "'function', 'triton'"),
    ("train.resolution=huge", "train.resolution: 'huge' is not an integer or one of 'half' or null"),
    ("train.epochs=true", "train.epochs: True is not an integer"),
    ("train.val_resolutions=[224, x]", "train.val_resolutions[1]: 'x' is not an integer"),
    ("optimizer.betas=[0.9]", "optimizer.betas: [0.9] is not a list of 2 values"),
    ("train.progressive=3", "train.progressive: 3 is not a mapping with keys stages, start_resolution, mixup_alpha, "
                            "dropout, randaugment or null"),
    ("train.progressive.stages=1", "train.progressive.stages: 1 is below the minimum 2"),
    ("model", "--set 'model': expected section.key=value"),
    ("train.compile_mode=reduce-overhead", "train.compile_mode: 'reduce-overhead' takes effect only with "
                                           "train.compile: true"),
])
def test_errors_name_the_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="loops back"):
        load_config(write(tmp_path, "loop.yml", "base: loop.yml\n"))


def test_defaults_are_a_valid_config():
    assert load_config(None) == Config()


@pytest.mark.slow
def test_cli_prints_resolved_config_and_user_errors_without_traceback():
    cmd = [sys.executable, "-m", "train", "--config", "configs/models/efficientnet-b0-g16-ln-pn.yml"]
    ok = subprocess.run(cmd + ["--print-config", "--set", "train.epochs=2"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["model"]["proxy_norm"] is True and printed["train"]["epochs"] == 2
    bad = subprocess.run(cmd + ["--print-config", "--set", "model.nrom=layer"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert "did you mean 'model.norm'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("text, expected", [
    ("", "is empty"),
    ("model:\n  norm: layer\n  norm: group\n", ":3:3: not valid YAML: key 'norm' is given twice (first on line 2)"),
    ("base:\nmodel: {}\n", "base: None is not a file name or a list of file names"),
    ("base: 3\n", "base: 3 is not a file name or a list of file names"),
    ("base: [a.yml, 4]\n", "base: ['a.yml', 4] is not a file name"),
    ("optimizer:\n  lr: .nan\n", "optimizer.lr: nan is not a finite number"),
    ("data:\n  crop_scale: [.inf, 1.0]\n", "data.crop_scale[0]: inf is not a finite number"),
    ("name: ../../x\n", "name: '../../x' is not a plain folder name"),
    ("model: [unclosed\n", ":2:1: not valid YAML: expected ',' or ']'"),
])
def test_recipe_mistakes_found_when_loading(tmp_path, text, expected):
    path = write(tmp_path, "recipe.yml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message and "\n" not in message
    if "YAML" in expected:
        assert message.startswith(path)


def test_run_names_stay_inside_the_run_folder():
    for bad in ("../x", "a/b", ".hidden", "", "x y"):
        with pytest.raises(ConfigError, match="name: .* is not a plain folder name"):
            load_config(None, [f"name={bad!s}"] if bad else ["name=''"])
    assert load_config(None, ["name=b0-g16_ln+pn.v2"]).name == "b0-g16_ln+pn.v2"


def test_every_key_is_documented_and_docs_config_md_is_current():
    from train.config_docs import key_docs, render_markdown

    docs = key_docs()
    assert [d.key for d in docs if not d.help] == []
    assert {"model.name", "train.nonfinite", "finetune.optimizer.lr", "ipu.pipeline[].start",
            "ipu.finetune.replicas"} <= {d.key for d in docs}
    expected = render_markdown(docs)
    assert (ROOT / "docs" / "config.md").read_text() == expected, \
        "docs/config.md is stale: regenerate it with python -m train --help-config markdown > docs/config.md"


def test_help_lists_every_key_with_type_default_and_allowed_values(capsys):
    from train.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "  train.nonfinite  (choice) = stop  [stop, skip]" in out
    assert "  optimizer.lr  (float) = 0.046875  [>= 0.0]" in out


def test_a_comma_separated_value_is_a_list_where_the_key_takes_one():
    cfg = load_config(None, ["train.val_resolutions=32,64", "data.crop_scale=0.1,1.0", "logging.name=a,b"])
    assert cfg.train.val_resolutions == [32, 64] and cfg.data.crop_scale == (0.1, 1.0)
    assert cfg.logging.name == "a,b"  # a string key keeps its commas
    with pytest.raises(ConfigError, match=r"train.val_resolutions\[1\]: 'x' is not an integer"):
        load_config(None, ["train.val_resolutions=32,x"])
    with pytest.raises(ConfigError, match=r"data.crop_scale"):
        load_config(None, ["data.crop_scale=0.1,0.5,1.0"])

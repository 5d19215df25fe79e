"""reidkit.config: _base_ inheritance, overrides, error messages, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from reidkit.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.height == 256 and cfg.data.width == 128
    assert cfg.solver.milestones == [40, 70]


def test_base_inheritance_relative_paths_and_deep_merge(tmp_path):
    write(
        tmp_path / "base" / "common.yaml",
        "seed: 3\nsolver:\n  lr: 0.1\n  milestones: [10, 20, 30]\n  max_epochs: 50\n"
        "data:\n  height: 384\n",
    )
    child = write(
        tmp_path / "exp" / "child.yaml",
        "_base_: ../base/common.yaml\nsolver:\n  lr: 0.01\n  milestones: [5]\n",
    )
    cfg = load_config(child)
    assert cfg.seed == 3
    assert cfg.solver.lr == 0.01  # child wins
    assert cfg.solver.max_epochs == 50  # sibling key of the base kept (deep merge)
    assert cfg.solver.milestones == [5]  # lists are replaced, not concatenated
    assert cfg.data.height == 384 and cfg.data.width == 128


def test_multiple_bases_merge_left_to_right_and_diamond(tmp_path):
    write(tmp_path / "root.yaml", "seed: 1\nsolver:\n  lr: 0.5\n")
    write(tmp_path / "a.yaml", "_base_: root.yaml\nsolver:\n  lr: 0.1\n  gamma: 0.5\n")
    write(tmp_path / "b.yaml", "_base_: root.yaml\nsolver:\n  lr: 0.2\n")
    top = write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\noutput_dir: runs/x\n")
    cfg = load_config(top)
    assert cfg.solver.lr == 0.2  # b (later) overrides a
    assert cfg.solver.gamma == 0.5  # from a, untouched by b
    assert cfg.seed == 1 and cfg.output_dir == "runs/x"


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="circular _base_"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "self.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "c.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml.*a _base_ of .*c.yaml"):
        load_config(child)
    lst = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(lst)
    bad = write(tmp_path / "bad.yaml", "solver: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML: .*expected .,. or .]."):
        load_config(bad)
    weird = write(tmp_path / "weird.yaml", "_base_: [1, 2]\n")
    with pytest.raises(ConfigError, match="'_base_' must be a path"):
        load_config(weird)
    empty_base = write(tmp_path / "nullbase.yaml", "_base_:\nseed: 4\n")
    assert load_config(empty_base).seed == 4
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "solver.lr=1e-3",
            "solver.max_epochs=7",
            "test.rerank=true",
            "solver.milestones=[3, 5]",
            "data.mean=[0.5, 0.5, 0.5]",
            "model.pretrained=null",
            "model.non_local_layers.layer2=[1]",
            "model.name=cama",
            "model.cama.num_branches=2",
            "solver.grad_clip=5",
        ],
    )
    assert cfg.solver.lr == pytest.approx(1e-3) and isinstance(cfg.solver.lr, float)
    assert cfg.solver.max_epochs == 7
    assert cfg.test.rerank is True
    assert cfg.solver.milestones == [3, 5]
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.model.pretrained is None
    assert cfg.model.non_local_layers == {"layer2": [1], "layer3": [3, 4, 5]}
    assert cfg.model.cama.num_branches == 2
    assert cfg.solver.grad_clip == 5.0


def test_overrides_keep_text_for_string_fields():
    cfg = load_config(
        None, ["output_dir=2024", "data.synth_preset=1", "model.pretrained=on", "amp=off"]
    )
    assert cfg.output_dir == "2024"
    assert cfg.data.synth_preset == "1"
    assert cfg.model.pretrained == "on"
    assert cfg.amp == "off"
    assert load_config(None, ["output_dir='quoted dir'"]).output_dir == "quoted dir"
    assert load_config(None, ["output_dir=a=b"]).output_dir == "a=b"


def test_yaml_files_use_yaml12_booleans_and_floats(tmp_path):
    f = write(
        tmp_path / "c.yaml",
        "amp: off\noutput_dir: 2024\nsolver:\n  lr: 3.5e-4\n  warmup_factor: 1e-2\n",
    )
    cfg = load_config(f)
    assert cfg.amp == "off"  # YAML 1.1 would have read `off` as False
    assert cfg.output_dir == "2024"
    assert cfg.solver.lr == pytest.approx(3.5e-4)
    assert cfg.solver.warmup_factor == pytest.approx(0.01)


def test_overrides_win_over_files(tmp_path):
    f = write(tmp_path / "c.yaml", "solver:\n  lr: 0.1\n")
    assert load_config(f, ["solver.lr=0.5"]).solver.lr == 0.5


def test_unknown_key_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["solver.lrr=0.1"])
    msg = str(exc.value)
    assert "unknown key 'solver.lrr'" in msg and "did you mean 'solver.lr'?" in msg
    with pytest.raises(ConfigError, match="did you mean 'solver'"):
        load_config(None, ["sovler.lr=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'model.cama.num_branches'"):
        load_config(None, ["model.cama.num_branch=2"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = write(tmp_path / "typo.yaml", "data:\n  heigth: 384\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = str(exc.value)
    assert str(f) in msg and "did you mean 'data.height'" in msg


def test_type_errors_name_key_and_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "solver:\n  lr: fast\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = str(exc.value)
    assert str(f) in msg and "'solver.lr'" in msg and "'fast'" in msg
    # inherited value: the message also names the base file that set it
    write(tmp_path / "base.yaml", "data:\n  height: -3\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    msg = str(exc.value)
    assert (
        str(child) in msg and "'data.height'" in msg and f"set in {tmp_path / 'base.yaml'}" in msg
    )
    with pytest.raises(ConfigError, match=r"'solver.optimizer'.*'adam'.*set in override"):
        load_config(None, ["solver.optimizer=adamx"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["solver.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["solver..lr=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["solver.milestones=[1, 2"])


def test_apply_overrides_does_not_mutate_input():
    raw = {"solver": {"lr": 0.1}}
    out = apply_overrides(raw, ["solver.lr=0.2", "data.height=64"])
    assert raw == {"solver": {"lr": 0.1}}
    assert out == {"solver": {"lr": 0.2}, "data": {"height": 64}}


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["solver.lr=0.02", "data.mean=[0.1, 0.2, 0.3]", "model.name=cge"])
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg


def test_config_from_dict_names_source():
    with pytest.raises(ConfigError, match=r"^my-source: invalid config"):
        config_from_dict({"seed": "x"}, source="my-source")

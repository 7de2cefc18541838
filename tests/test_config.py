"""The one schema of `fopro distill`: the command-line flags, the config-file keys and config.json all derive
from DistillConfig's fields, so they agree in names, defaults and types; validation runs before anything is read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from fopro.cli import app
from fopro.config import (
    DATA_KEYS,
    FIELDS,
    OPTION_FIELDS,
    PATH_KEYS,
    DistillConfig,
    flag,
    resolve_config,
    value_type,
)
from fopro.config_files import load_run_config, read_config_file, save_config
from fopro.errors import FoproError

NOT_IN_SCHEMA = {"config", "resume", "overwrite", "json_output", "help"}  # how to run, not what to run


def distill_params(command: str = "distill") -> dict:
    return {param.name: param for param in get_command(app).commands[command].params}


def test_every_field_is_a_flag_with_the_schemas_name_help_and_default() -> None:
    params = distill_params()
    assert set(params) - NOT_IN_SCHEMA == set(OPTION_FIELDS)
    assert set(FIELDS) - set(OPTION_FIELDS) == {"extra"}
    for name, spec in OPTION_FIELDS.items():
        param = params[name]
        assert param.opts[0] == flag(name)
        assert param.help == spec.metadata["help"] and param.help, name
        cli_default = spec.metadata["cli_default"]
        assert param.default == (spec.default if cli_default is None else cli_default), name


def test_flag_types_follow_the_field_types() -> None:
    """Numbers and switches parse as the field's type; paths as paths; lists and `--lr auto` as text for the schema to parse."""
    params = distill_params()
    for name in OPTION_FIELDS:
        kind = value_type(name)
        expected = Path if name in PATH_KEYS else str if OPTION_FIELDS[name].metadata["cli_text"] else kind
        assert params[name].type_descriptor.annotation is expected, name
        assert expected in (Path, str) or kind is expected, name


def test_the_command_line_defaults_resolve_to_the_dataclass_defaults() -> None:
    """Every flag left at its default gives DistillConfig() (e.g. --lr auto is lr None)."""
    params = distill_params()
    values = {name: params[name].default for name in OPTION_FIELDS}
    assert resolve_config({}, values) == DistillConfig()


def test_a_config_file_accepts_every_option_and_only_those(tmp_path: Path) -> None:
    defaults = DistillConfig().to_dict()
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({name: defaults[name] for name in OPTION_FIELDS}))
    assert resolve_config(read_config_file(path), {}) == DistillConfig()
    path.write_text("extra: {}\n")
    with pytest.raises(FoproError, match="unknown key"):
        read_config_file(path)


def test_config_json_round_trips_every_field(tmp_path: Path) -> None:
    config = resolve_config({}, {"data": "d", "scale": "0.8,1.0", "classes": "a,b", "lr": "3e-4", "workers": 2, "method": "ekd"})
    save_config(config, tmp_path / "config.json")
    assert set(json.loads((tmp_path / "config.json").read_text())) == set(FIELDS)
    assert load_run_config(tmp_path) == config
    assert (config.scale, config.classes, config.lr, config.workers) == ([0.8, 1.0], ["a", "b"], 3e-4, 2)


def test_the_data_options_of_every_command_are_the_schemas() -> None:
    for command in ("eval", "probe", "export"):
        params = distill_params(command)
        for name in DATA_KEYS:
            assert params[name].help == FIELDS[name].metadata["help"], (command, name)


def test_class_names_with_commas_as_a_json_list() -> None:
    assert resolve_config({}, {"classes": '["nevus, atypical", "melanoma"]'}).classes == ["nevus, atypical", "melanoma"]
    assert resolve_config({}, {"classes": "a, b,c"}).classes == ["a", "b", "c"]
    with pytest.raises(FoproError, match="not a JSON list"):
        resolve_config({}, {"classes": '["a", '})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"fpg_strength": 1.0}, r"--fpg-strength 1.0 must be in \(0, 1\)"),
        ({"fpg_mode": "spatial"}, "--fpg-mode spatial is not known"),
        ({"fpg_hidden": 0}, "--fpg-hidden 0 must be at least 1"),
        ({"align_focus": -1.0}, "--align-focus -1.0 must not be negative"),
        ({"method": "none", "align_focus": 2.0}, "--align-focus weighs the alignment term, which --method none has not"),
        ({"tail_threshold": 30, "head_threshold": 10}, "--tail-threshold 30 is above --head-threshold 10"),
        ({"teacher_image_size": 8}, "--teacher-image-size 8 must be between 16 and 2048"),
        ({"augment": "xray"}, "--augment xray is not known"),
        ({"workers": "two"}, "workers = 'two' has the wrong type: expected an integer"),
        ({"skip_bad_images": "yes"}, "expected true or false"),
    ],
)
def test_every_rule_is_checked_when_the_options_are_resolved(values: dict, message: str) -> None:
    with pytest.raises(FoproError, match=message):
        resolve_config({}, values)


def test_every_method_field_reaches_the_method_config() -> None:
    """MethodConfig's fields are DistillConfig options of the same name (method -> name), passed through unchanged."""
    values = {"method": "ekd", "ekd_weight": 7.0, "align_weights": "balanced", "align_focus": 1.5, "second_head": False, "prompt_fraction": 0.5}
    method = resolve_config({}, values).method_config()
    assert (method.name, method.ekd_weight, method.align_weights, method.align_focus, method.second_head, method.prompt_fraction) == (
        "ekd", 7.0, "balanced", 1.5, False, 0.5)
    assert {f.name for f in dataclasses.fields(method)} - {"name"} <= set(FIELDS)


@pytest.mark.parametrize(
    "values, gamma",
    [({}, 2.0), ({"method": "ekd"}, 2.0), ({"method": "ekd", "align_focus": 0.0}, 0.0), ({"method": "ekd", "align_focus": 1.0}, 1.0),
     ({"method": "fopro"}, 0.0), ({"method": "kd"}, 0.0), ({"method": "fopro", "align_focus": 2.0}, 2.0), ({"method": "none"}, 0.0)],
)
def test_align_focus_defaults_to_the_gamma_chosen_for_ekd_and_to_0_elsewhere(values: dict, gamma: float) -> None:
    """The default method is ekd with --align-focus 2 (both chosen on val, README "The method in fopro"); a given
    --align-focus always wins, and --method none (no alignment term) takes the default without an error."""
    config = resolve_config({}, {"data": "d", **values})
    assert config.method == values.get("method", "ekd")
    assert config.align_focus == values.get("align_focus") and config.method_config().align_focus == gamma


def test_a_run_saved_before_align_focus_resumes_without_it(tmp_path: Path) -> None:
    """config.json of fopro 0.7 has no align_focus: its run resumes as it ran (gamma 0), not with today's default."""
    config = resolve_config({}, {"data": "d", "method": "ekd"})
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["align_focus"] is None  # the method's default, like --lr auto
    del saved["align_focus"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_run_config(tmp_path).method_config().align_focus == 0.0


@pytest.mark.parametrize(
    "values, head",
    [({}, "fc_t"), ({"method": "fopro"}, "fc_t"), ({"method": "ekd", "second_head": False}, "fc"), ({"method": "kd"}, "fc"),
     ({"method": "none"}, "fc"), ({"method": "ekd", "deploy_head": "fc"}, "fc"), ({"method": "fopro", "deploy_head": "fc_t"}, "fc_t")],
)
def test_deploy_head_auto_keeps_fc_t_when_the_run_trains_it(values: dict, head: str) -> None:
    assert resolve_config({}, {"data": "d", **values}).method_config().deploy_head == head


@pytest.mark.parametrize("values", [{"method": "kd", "deploy_head": "fc_t"}, {"method": "none", "deploy_head": "fc_t"},
                                    {"method": "ekd", "second_head": False, "deploy_head": "fc_t"}])
def test_deploy_head_fc_t_without_the_second_head_is_refused(values: dict) -> None:
    with pytest.raises(FoproError, match="--deploy-head fc_t is EKD's second head"):
        resolve_config({}, {"data": "d", **values})


def test_a_run_saved_before_deploy_head_resumes_with_fc(tmp_path: Path) -> None:
    config = resolve_config({}, {"data": "d", "method": "ekd"})
    saved = config.to_dict()
    del saved["deploy_head"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_run_config(tmp_path).method_config().deploy_head == "fc"

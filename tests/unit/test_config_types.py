"""Every key of the deployment file, given a value of the wrong YAML type, is a ConfigError naming it.

`instance_env: ["A=1"]` used to crash with AttributeError; this sweeps every key
(top level, per model, the models list itself) with every container and scalar type.
"""

from __future__ import annotations

import pytest

from vfgen import config
from vfgen.errors import VfgenError
from vfgen.plan import build_plan
from vfgen.render import render_all

VALUES = [[], {}, "x", 1, 1.5, True, None, [1], [None], [{}], [[1]], ["A=1"], ["A=1", "B=2"], [1, 2], {"a": []}, {"a": {"b": 1}}, {"1": None}]


def outcome(raw: dict) -> None:
    try:
        render_all(build_plan(config.parse_deployment(raw, source="deploy.yaml")))
    except VfgenError:
        pass  # a one-line error naming the field; anything else propagates and fails


@pytest.mark.parametrize("key", sorted(config._GLOBAL_KEYS - {"models"}))
def test_top_level_keys(key: str) -> None:
    for value in VALUES:
        outcome({"models": [{"model": "org/m", "instances": 2}], key: value})


@pytest.mark.parametrize("key", sorted(config._MODEL_KEYS))
def test_model_keys(key: str) -> None:
    for value in VALUES:
        outcome({"models": [{"model": "org/m", "instances": 2, key: value}]})


def test_models_list() -> None:
    for value in VALUES:
        outcome({"models": value})


def test_wrong_instance_env_type_names_the_entry() -> None:
    with pytest.raises(VfgenError, match=r"models\[0\]\.instance_env\[1\]='A=1': must be a mapping"):
        config.parse_deployment({"models": [{"model": "org/m", "instances": 2, "instance_env": [{}, "A=1"]}]},
                                source="deploy.yaml")

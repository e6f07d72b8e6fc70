"""``--set key=1e-4`` and suite YAML files read numbers with one parser (editbench.values), YAML 1.2 floats included."""

from __future__ import annotations

import argparse
import math

import pytest
import yaml

from editbench import methods
from editbench.commands import _kv, train_overrides
from editbench.errors import EditbenchError
from editbench.eval import spec as suite_spec
from editbench.values import load_yaml, parse_value


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("1E-4", 1e-4), ("5e3", 5000.0), ("-2e+8", -2e8), ("+3e0", 3.0), ("1.5e-3", 1.5e-3),
    ("7.95e-4", 7.95e-4), (".5", 0.5), ("-.5e-2", -0.005), ("0.001", 0.001), ("1_000.5", 1000.5), ("3.", 3.0)])
def test_exponent_numbers_are_floats(text, value):
    got = parse_value(text)
    assert isinstance(got, float) and got == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0", 0), ("true", True), ("false", False), ("null", None), ("~", None),
    ("abc", "abc"), ("1e", "1e"), ("e5", "e5"), ("1e-4x", "1e-4x"), ("1.2.3", "1.2.3"), ("", None),
    ("[1e-3, 2]", [0.001, 2]), ("{a: 2e-3}", {"a": 0.002}), ("'1e-4'", "1e-4"),
    ("[1,2", "[1,2"),  # not valid YAML: the text as it is, never a traceback
])
def test_other_values_read_as_before(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_special_floats():
    assert parse_value(".inf") == math.inf and parse_value("-.inf") == -math.inf and math.isnan(parse_value(".nan"))


def test_the_loader_leaves_pyyaml_alone():
    load_yaml("x: 1e-4")
    assert yaml.safe_load("x: 1e-4") == {"x": "1e-4"}  # SafeLoader's resolvers are not patched in place


def test_set_items_use_the_parser():
    assert _kv(["lr=1e-4", "beta=0.7", "name=a=b", "flag=true", " steps = 3"]) == \
        {"lr": 1e-4, "beta": 0.7, "name": "a=b", "flag": True, "steps": 3}
    for bad in ("lr", "=1e-4"):
        with pytest.raises(EditbenchError, match="key=value"):
            _kv([bad])


def test_train_set_lr_1e_4_reaches_the_config():
    args = argparse.Namespace(set=["lr=1e-4", "embedding_norm_cap=2e0"])
    editor = methods.get("textual_inversion")(**train_overrides(args))
    assert editor.config.lr == 1e-4 and editor.config.embedding_norm_cap == 2.0


def test_suite_yaml_reads_1e_4_as_a_number(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmodel: tiny\nconcepts: [zebra]\nmethods:\n"
                    "  - name: textual_inversion\n    config: {lr: 1e-4, embedding_norm_cap: 1.5E+0}\n"
                    "  - name: perfusion\n    settings: {beta: 5e-1}\n    sweep: {tau: [1e-1, 2e-1]}\n")
    suite = suite_spec.load_suite(path)
    ti, pf = suite.methods
    assert ti.config == {"lr": 1e-4, "embedding_norm_cap": 1.5}
    assert pf.settings == {"beta": 0.5} and pf.sweep == {"tau": [0.1, 0.2]}
    suite.validate()  # the configs and settings are accepted as numbers

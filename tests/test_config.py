from dataclasses import dataclass, field
from typing import Literal

import pytest

from flowtok.config import apply_overrides, from_dict, load_yaml, to_dict
from flowtok.errors import ConfigError


@dataclass
class Inner:
    width: int = 8
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_roundtrip_and_nested():
    cfg = from_dict(Outer, {"lr": 1, "inner": {"width": 16, "mode": "b"}, "betas": [0.8, 0.9]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.width == 16 and cfg.betas == (0.8, 0.9)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, needle", [
    ({"nmae": "x"}, "unknown config key 'nmae'"),
    ({"inner": {"widht": 3}}, "unknown config key 'inner.widht'"),
    ({"lr": "fast"}, "lr: expected a number"),
    ({"inner": {"width": 2.5}}, "inner.width: expected an integer"),
    ({"inner": {"mode": "c"}}, "inner.mode: expected one of"),
    ({"betas": [0.9]}, "betas: expected 2 items"),
    ({"maybe": "no"}, "maybe: expected an integer"),
])
def test_bad_configs_name_the_key(data, needle):
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "train.steps=10", "model.name=big", "flag=true"])
    assert data == {"train": {"lr": 3e-4, "steps": 10}, "model": {"name": "big"}, "flag": True}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listy)

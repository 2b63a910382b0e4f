"""Recipes: which layers to compress and how, from YAML or keyword arguments.

A recipe is ``version``, ``defaults`` (layer settings), ``layers`` (ordered rules) and an optional
``finetune`` section. A rule matches by exact ``name``, by ``regex`` (``re.fullmatch`` on the fully
qualified module name) or by module ``type`` (``Linear``, ``Conv1d``, ``Conv2d``) and either sets
layer settings or says ``skip: true``.

Priority (like torch.ao's QConfigMapping): exact name > regex > type > defaults. The settings of a layer
are the defaults overridden by the first matching type rule, then the first matching regex rule, then
the first matching name rule; a ``skip`` from the highest-priority matching rule wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .groups import group as parse_group

__all__ = ["LayerSettings", "Rule", "Recipe", "RecipeError", "load_recipe", "parse_recipe"]

LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")
ON_MISMATCH = ("skip", "pad", "error")
IMPLS = ("auto", "dense", "blocks", "fft")
BIAS = ("keep", "shared")


class RecipeError(ValueError):
    """A malformed recipe: the message names the file, the key path and what was expected."""


@dataclass(frozen=True)
class LayerSettings:
    """How one layer is compressed.

    ``group`` applies to Linear layers and 1x1 convolutions (over features / channels); k x k
    convolutions use ``conv_group`` (a group of the square: C2, C4, D2, D4) and are left dense when it
    is None. ``support`` restricts kernels to those group elements. ``activation_aware`` uses the
    calibration batches when ``compress`` gets some. ``bias="shared"`` replaces the bias by its mean
    over each channel's group axis (exactly equivariant), ``"keep"`` copies it.
    """

    group: str | None = None
    rank: int = 1
    modulate: bool = True
    support: tuple[int, ...] | None = None
    min_features: int = 0
    on_mismatch: str = "skip"
    impl: str = "auto"
    conv_group: str | None = None
    lifting: bool | None = None
    activation_aware: bool = True
    damping: float = 0.1
    bias: str = "keep"


SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "group": (str, type(None)),
    "rank": (int,),
    "modulate": (bool,),
    "support": (list, type(None)),
    "min_features": (int,),
    "on_mismatch": (str,),
    "impl": (str,),
    "conv_group": (str, type(None)),
    "lifting": (bool, type(None)),
    "activation_aware": (bool,),
    "damping": (float, int),
    "bias": (str,),
}

FINETUNE_TYPES: dict[str, tuple[type, ...]] = {
    "epochs": (int,),
    "steps": (int,),
    "lr": (float, int),
    "batch_size": (int,),
    "loss": (str,),
    "temperature": (float, int),
    "alpha": (float, int),
    "warmup": (float, int),
    "weight_decay": (float, int),
    "clip": (float, int, type(None)),
    "checkpoint_dir": (str, type(None)),
    "device": (str, type(None)),
    "amp": (bool, str, type(None)),
    "seed": (int,),
}


@dataclass(frozen=True)
class Rule:
    """One ``layers`` entry: a matcher (name, regex or type), settings to override, or ``skip``."""

    kind: str  # "name" | "regex" | "type"
    pattern: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    skip: bool = False

    def matches(self, name: str, module_type: str) -> bool:
        if self.kind == "name":
            return name == self.pattern
        if self.kind == "regex":
            return re.fullmatch(self.pattern, name) is not None
        return module_type == self.pattern


@dataclass(frozen=True)
class Recipe:
    defaults: LayerSettings = field(default_factory=LayerSettings)
    rules: tuple[Rule, ...] = ()
    finetune: Mapping[str, Any] | None = None
    source: str = "<kwargs>"

    def resolve(self, name: str, module_type: str) -> tuple[LayerSettings | None, str]:
        """Settings for a layer (None when a rule skips it) and a short description of what decided."""
        chosen: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.kind not in chosen and rule.matches(name, module_type):
                chosen[rule.kind] = rule
        settings, skipped, decided = self.defaults, False, "defaults"
        for kind in ("type", "regex", "name"):  # increasing priority
            rule = chosen.get(kind)
            if rule is not None:
                decided = f"{kind} rule {rule.pattern!r}"
                skipped = rule.skip
                settings = replace(settings, **rule.settings)
        return (None if skipped else settings), decided

    def with_overrides(self, **overrides: Any) -> Recipe:
        """The recipe with keyword arguments of ``compress`` overriding its defaults (None = keep)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "support" in given:
            given["support"] = tuple(given["support"])
        return replace(self, defaults=replace(self.defaults, **given))


def _fail(source: str, path: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {path}: {message}")


def _check_settings(raw: Mapping[str, Any], source: str, path: str, allow_skip: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("name", "regex", "type") and allow_skip:
            continue
        if key == "skip" and allow_skip:
            if not isinstance(value, bool):
                raise _fail(source, f"{path}.skip", f"expected true or false, got {value!r}")
            continue
        if key not in SETTING_TYPES:
            expected = sorted(SETTING_TYPES) + (["skip", "name", "regex", "type"] if allow_skip else [])
            raise _fail(source, f"{path}.{key}", f"unknown key (expected one of {', '.join(expected)})")
        types = SETTING_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _fail(source, f"{path}.{key}", f"expected {names}, got {value!r}")
        out[key] = _check_value(key, value, source, f"{path}.{key}")
    return out


def _check_value(key: str, value: Any, source: str, path: str) -> Any:
    if key in ("group", "conv_group") and value is not None:
        try:
            parse_group(value)
        except ValueError as err:
            raise _fail(source, path, str(err)) from None
    if key == "rank" and value < 1:
        raise _fail(source, path, f"expected a rank >= 1, got {value}")
    if key == "min_features" and value < 0:
        raise _fail(source, path, f"expected min_features >= 0, got {value}")
    if key == "damping" and value < 0:
        raise _fail(source, path, f"expected damping >= 0, got {value}")
    choices = {"on_mismatch": ON_MISMATCH, "impl": IMPLS, "bias": BIAS}.get(key)
    if choices and value not in choices:
        raise _fail(source, path, f"expected one of {', '.join(choices)}, got {value!r}")
    if key == "support" and value is not None:
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise _fail(source, path, f"expected a non-empty list of element indices, got {value!r}")
        return tuple(value)
    if key == "damping":
        return float(value)
    return value


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML)."""
    if not isinstance(data, Mapping):
        raise _fail(source, "<top>", f"expected a mapping with version/defaults/layers, got {type(data).__name__}")
    allowed = {"version", "defaults", "layers", "finetune"}
    for key in data:
        if key not in allowed:
            raise _fail(source, str(key), f"unknown key (expected one of {', '.join(sorted(allowed))})")
    if data.get("version") != 1:
        raise _fail(source, "version", f"expected 1, got {data.get('version')!r}")
    defaults_raw = data.get("defaults") or {}
    if not isinstance(defaults_raw, Mapping):
        raise _fail(source, "defaults", "expected a mapping of layer settings")
    defaults = LayerSettings(**_check_settings(defaults_raw, source, "defaults", allow_skip=False))
    layers = data.get("layers") or []
    if not isinstance(layers, list):
        raise _fail(source, "layers", "expected a list of rules")
    rules = []
    for i, raw in enumerate(layers):
        path = f"layers[{i}]"
        if not isinstance(raw, Mapping):
            raise _fail(source, path, f"expected a mapping with one of name/regex/type, got {raw!r}")
        matchers = [k for k in ("name", "regex", "type") if k in raw]
        if len(matchers) != 1:
            raise _fail(source, path, f"expected exactly one of name, regex, type; got {matchers or 'none'}")
        kind = matchers[0]
        pattern = raw[kind]
        if not isinstance(pattern, str):
            raise _fail(source, f"{path}.{kind}", f"expected a string, got {pattern!r}")
        if kind == "regex":
            try:
                re.compile(pattern)
            except re.error as err:
                raise _fail(source, f"{path}.regex", f"invalid regular expression: {err}") from None
        if kind == "type" and pattern not in LAYER_TYPES:
            raise _fail(source, f"{path}.type", f"expected one of {', '.join(LAYER_TYPES)}, got {pattern!r}")
        settings = _check_settings(raw, source, path, allow_skip=True)
        rules.append(Rule(kind, pattern, settings, bool(raw.get("skip", False))))
    finetune = data.get("finetune")
    if finetune is not None:
        if not isinstance(finetune, Mapping):
            raise _fail(source, "finetune", "expected a mapping of fine-tuning settings")
        for key, value in finetune.items():
            if key not in FINETUNE_TYPES:
                raise _fail(
                    source, f"finetune.{key}", f"unknown key (expected one of {', '.join(sorted(FINETUNE_TYPES))})"
                )
            types = FINETUNE_TYPES[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise _fail(source, f"finetune.{key}", f"expected {names}, got {value!r}")
        finetune = dict(finetune)
    return Recipe(defaults, tuple(rules), finetune, source)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    return parse_recipe(data, str(path))


def setting_names() -> list[str]:
    return [f.name for f in fields(LayerSettings)]

"""Recipes: which layers to compress and how, from YAML, a dict or keyword arguments.

A recipe is ``version``, ``defaults`` (layer settings, :class:`~gmcompress.planning.settings.LayerSettings`),
``layers`` (ordered rules) and an optional ``finetune`` section (the keyword arguments of
:func:`gmcompress.finetune`). A rule matches by exact ``name``, by ``regex`` or by module ``type``
(``Linear``, ``Conv1d``, ``Conv2d``, ... as :func:`gmcompress.planning.handlers.type_names` lists; subclasses
match their base type) and either sets layer settings or says ``skip: true``.

Regular expressions, here and in ``compress(include=..., exclude=...)``, must match the *whole* fully
qualified module name (:func:`name_matches`, ``re.fullmatch``): ``"encoder\\..*\\.ffn\\..*"``, not ``"ffn"``.

Priority (like torch.ao's QConfigMapping): exact name > regex > type > defaults. The settings of a layer
are the defaults overridden by the first matching type rule, then the first matching regex rule, then
the first matching name rule; a ``skip`` from the highest-priority matching rule wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .planning.budget_spec import Budget
from .planning.handlers import type_names
from .planning.settings import SETTING_TYPES, LayerSettings, check_setting
from .training.settings import AMP, BATCHNORM, LOSSES, NONFINITE, RESUME, TRAINABLE, check_feature_names

__all__ = ["Rule", "Recipe", "RecipeError", "load_recipe", "parse_recipe", "name_matches", "check_pattern"]


class RecipeError(ValueError):
    """A malformed recipe: the message names the file, the key path and what was expected."""


def name_matches(pattern: str, name: str) -> bool:
    """The one matching rule for module-name regexes: the pattern matches the whole name."""
    return re.fullmatch(pattern, name) is not None


def check_pattern(pattern: object, what: str) -> str:
    """A module-name regex (``include``, ``exclude``, a ``regex:`` rule) that compiles; else an error naming ``what``
    and the pattern (``TypeError`` when it is no string)."""
    if not isinstance(pattern, str):
        raise TypeError(
            f"{what}: expected a regular expression (str), got {pattern!r} of type {type(pattern).__name__}"
        )
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"{what}: invalid regular expression {pattern!r} ({err}); it must match whole module names, "
            r"e.g. 'fc\d' or 'encoder\..*' (escape literal brackets, dots and parentheses with a backslash)"
        ) from None
    return pattern


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
    "checkpoint_every": (int,),
    "resume": (str,),
    "nonfinite": (str,),
    "device": (str, type(None)),
    "amp": (bool, str, type(None)),
    "seed": (int,),
    "features": (list,),
    "batchnorm": (str,),
    "trainable": (str,),
}


def _one_of(choices: tuple[str, ...]) -> tuple[str, Any]:
    return f"one of {', '.join(choices)}", lambda v: v in choices


def _feature_names(names: object) -> bool:
    try:
        check_feature_names(names)
    except ValueError:
        return False
    return True


# the ranges of the settings a recipe's finetune section may give; the choices are the training settings' own
# (gmcompress.training.settings), which check the run's settings again with the other arguments of finetune
FINETUNE_RANGES: dict[str, tuple[str, Any]] = {
    "epochs": (">= 1", lambda v: v >= 1),
    "steps": (">= 1", lambda v: v >= 1),
    "lr": ("> 0", lambda v: v > 0),
    "batch_size": (">= 1", lambda v: v >= 1),
    "loss": _one_of(LOSSES),
    "temperature": ("> 0", lambda v: v > 0),
    "alpha": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "warmup": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "clip": ("> 0 or null", lambda v: v is None or v > 0),
    "checkpoint_every": (">= 1", lambda v: v >= 1),
    "resume": _one_of(RESUME),
    "nonfinite": _one_of(NONFINITE),
    "amp": ("null, false, true, bf16 or fp16", lambda v: v in AMP),
    "features": ("a non-empty list of submodule names", _feature_names),
    "batchnorm": _one_of(BATCHNORM),
    "trainable": _one_of(TRAINABLE),
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
            return name_matches(self.pattern, name)
        return module_type == self.pattern


@dataclass(frozen=True)
class Recipe:
    defaults: LayerSettings = field(default_factory=LayerSettings)
    rules: tuple[Rule, ...] = ()
    finetune: Mapping[str, Any] | None = None
    source: str = "<kwargs>"
    budget: Budget | None = None

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

    def unmatched_names(self, layer_names: Collection[str]) -> list[str]:
        """The names of the ``name:`` rules that match none of ``layer_names`` (a typo, or another model's layer)."""
        return [r.pattern for r in self.rules if r.kind == "name" and r.pattern not in layer_names]

    def with_overrides(self, **overrides: Any) -> Recipe:
        """The recipe with keyword arguments of ``compress`` overriding its defaults (None = keep)."""
        given = {}
        for key, value in overrides.items():
            if value is not None:
                try:
                    given[key] = check_setting(key, value)
                except ValueError as err:
                    raise ValueError(f"compress(..., {key}={value!r}): {err}") from None
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
        try:
            out[key] = check_setting(key, value)
        except ValueError as err:
            raise _fail(source, f"{path}.{key}", str(err).removeprefix(f"{key}: ")) from None
    return out


def _check_rule(raw: Any, source: str, path: str) -> Rule:
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
            check_pattern(pattern, f"{path}.regex")
        except ValueError as err:
            raise RecipeError(f"{source}: {err}") from None
    if kind == "type" and pattern not in type_names():
        raise _fail(source, f"{path}.type", f"expected one of {', '.join(type_names())}, got {pattern!r}")
    settings = _check_settings(raw, source, path, allow_skip=True)
    return Rule(kind, pattern, settings, bool(raw.get("skip", False)))


def _check_finetune(finetune: Any, source: str) -> dict[str, Any]:
    if not isinstance(finetune, Mapping):
        raise _fail(source, "finetune", "expected a mapping of fine-tuning settings")
    for key, value in finetune.items():
        path = f"finetune.{key}"
        if key not in FINETUNE_TYPES:
            raise _fail(source, path, f"unknown key (expected one of {', '.join(sorted(FINETUNE_TYPES))})")
        types = FINETUNE_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _fail(source, path, f"expected {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(source, path, f"expected a finite number, got {value!r}")
        if key in FINETUNE_RANGES:
            what, ok = FINETUNE_RANGES[key]
            if not ok(value):
                raise _fail(source, path, f"expected {what}, got {value!r}")
    return dict(finetune)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML)."""
    if not isinstance(data, Mapping):
        raise _fail(source, "<top>", f"expected a mapping with version/defaults/layers, got {type(data).__name__}")
    allowed = {"version", "defaults", "layers", "finetune", "budget"}
    for key in data:
        if key not in allowed:
            raise _fail(source, str(key), f"unknown key (expected one of {', '.join(sorted(allowed))})")
    if data.get("version") != 1:
        raise _fail(source, "version", f"expected 1, got {data.get('version')!r}")
    defaults_raw = data.get("defaults") or {}
    if not isinstance(defaults_raw, Mapping):
        raise _fail(source, "defaults", "expected a mapping of layer settings")
    budget = _check_budget(data.get("budget"), source)
    defaults_raw, budget = _budget_candidates(defaults_raw, budget, data.get("budget"), source)
    defaults = LayerSettings(**_check_settings(defaults_raw, source, "defaults", allow_skip=False))
    layers = data.get("layers") or []
    if not isinstance(layers, list):
        raise _fail(source, "layers", "expected a list of rules")
    rules = tuple(_check_rule(raw, source, f"layers[{i}]") for i, raw in enumerate(layers))
    finetune = data.get("finetune")
    finetune = None if finetune is None else _check_finetune(finetune, source)
    return Recipe(defaults, rules, finetune, source, budget)


def _check_budget(raw: Any, source: str) -> Budget | None:
    """``budget: {params: 4.0}`` (or speedup / max_error, with optional ``groups: C`` or a list)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _fail(source, "budget", f"expected a mapping such as {{params: 4.0}}, got {raw!r}")
    try:
        return Budget.parse(raw)
    except (ValueError, TypeError) as err:
        raise _fail(source, "budget", str(err)) from None


def _budget_candidates(
    defaults: Mapping[str, Any], budget: Budget | None, budget_raw: Any, source: str
) -> tuple[Mapping[str, Any], Budget | None]:
    """With a ``budget:`` section, ``defaults.group`` names the candidate groups (a family such as ``C``, a group
    or a list), as ``compress(group=..., budget=...)`` does; the base rules then take the first candidate."""
    group = defaults.get("group")
    if budget is None or group is None:
        return defaults, budget
    if "groups" in budget_raw:
        raise _fail(
            source,
            "defaults.group",
            f"{group!r} and budget.groups {budget_raw['groups']!r} both name the budget's candidate groups; keep one",
        )
    try:
        budget = replace(budget, groups=group)
    except ValueError as err:
        raise _fail(source, "defaults.group", str(err)) from None
    return {**defaults, "group": budget.groups[0]}, budget


def load_recipe(recipe: str | Path | Mapping[str, Any]) -> Recipe:
    """Read and validate a YAML recipe file (or validate a recipe given as a dict)."""
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, "<recipe dict>")
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(f"recipe must be a YAML path, a dict or a Recipe, got {type(recipe).__name__}")
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    return parse_recipe(data, str(path))

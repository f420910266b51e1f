"""Recipe loading: YAML + CLI overrides -> a typed, validated ``Recipe``.

Every mistake becomes a ``UserError`` naming the key path and the file; unknown keys suggest the closest
valid key. The stage blocks' partial ``training`` sections are filled from the top-level ``training``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List

import yaml

from pipeline.config.schema import TRAIN_STAGES, Recipe, TrainingConfig
from pipeline.errors import UserError


def load_recipe(path: str, overrides: List[str] = ()) -> Recipe:
    """Read ``path``, apply ``key.path=value`` overrides, build and validate the recipe."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    recipe = build_recipe(raw, source=path)
    from pipeline.config.validate import validate

    validate(recipe, source=path)
    return recipe


def read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text (UTF-8) recipe file (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise UserError(f"{path}:{e.line}: key '{e.key}' is given twice (first at line {e.first}); "
                        "keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty (start from recipes/tiny.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe must say each key once."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader's own error names unhashable keys
            if key in seen:
                raise DuplicateKeyError(str(key), line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so 3, 1e-4, true, [1, 2] get their types)."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {item!r}: empty key component")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build_recipe(raw: Dict[str, Any], source: str = "<recipe>") -> Recipe:
    raw = dict(raw)
    top_training = raw.get("training") or {}
    top_parallel = raw.get("parallelism") or {}
    for stage in TRAIN_STAGES:
        block = raw.get(stage)
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise UserError(f"{source}: {stage} must be a mapping, got {type(block).__name__}")
        stage_training = block.get("training") or {}
        if not isinstance(stage_training, dict):
            raise UserError(f"{source}: {stage}.training must be a mapping")
        if not isinstance(top_training, dict):
            raise UserError(f"{source}: training must be a mapping")
        stage_parallel = block.get("parallelism") or {}
        if not isinstance(stage_parallel, dict) or not isinstance(top_parallel, dict):
            raise UserError(f"{source}: parallelism and {stage}.parallelism must be mappings")
        raw[stage] = {**block, "training": {**top_training, **stage_training},
                      "parallelism": {**top_parallel, **stage_parallel}}
    return to_dataclass(Recipe, raw, path="", source=source)


def to_dataclass(cls, data: Any, path: str, source: str):
    where = path or "the recipe"
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
            raise UserError(f"{source}: unknown key '{_join(path, key)}'{hint}")
    kwargs = {k: convert(hints[k], v, _join(path, k), source) for k, v in data.items()}
    return cls(**kwargs)


def convert(tp, value: Any, path: str, source: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return to_dataclass(tp, value or {}, path, source)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert(args[0], value, path, source)
    if origin in (list, List):
        if not isinstance(value, list):
            raise UserError(f"{source}: {path} must be a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise UserError(f"{source}: {path} must be a mapping, got {_describe(value)}")
        _, item = typing.get_args(tp)
        return {k: convert(item, v, f"{path}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and value is None:
        return ""
    if tp is bool and not isinstance(value, bool) or not isinstance(value, tp) or (
        tp is int and isinstance(value, bool)
    ):
        raise UserError(f"{source}: {path} must be {tp.__name__}, got {_describe(value)}")
    return value


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def for_stage(recipe: Recipe, stage: str) -> Recipe:
    """The recipe a training stage runs with: its ``<stage>.parallelism`` block (the top-level one with the
    stage's overrides) as ``parallelism``. Other stages run with the top-level layout."""
    if stage not in TRAIN_STAGES:
        return recipe
    return dataclasses.replace(recipe, parallelism=getattr(recipe, stage).parallelism)


def stage_training(recipe: Recipe, stage: str) -> TrainingConfig:
    return getattr(recipe, stage).training


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__

"""A job file plus dotted overrides, read into a JobConfig; errors name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, Tag, ValidationError

from pear_ray.config.base import ConfigError
from pear_ray.config.job import JobConfig


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML so `3`, `true`, `[1, 8]` get types."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error.problem})") from None
    glued = _glued_key(value)
    if glued is not None:
        raise ConfigError(f"override {override!r}: YAML reads {glued!r} as one key with no value; put a space after "
                          f"the colon: {glued.replace(':', ': ', 1)}")
    set_dotted(tree, key, value)


def _glued_key(value: Any) -> str | None:
    """The first key of a flow mapping written without a space after its colon (`{name:w}`, which YAML reads as the
    key 'name:w' with no value), anywhere in a parsed value; None when there is none."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key:
                return key
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _glued_key(item)
            if found is not None:
                return found
    return None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parents[: depth + 1])!r} is a value, not a section")
        node = child
    node[leaf] = value


def _union_tags(annotation: Any) -> set[str]:
    """The tags of a tagged union's members (`Annotated[Member, Tag("...")]`); none for any other type."""
    return {meta.tag for member in get_args(annotation) for meta in getattr(member, "__metadata__", ())
            if isinstance(meta, Tag)}


def _as_written(loc: tuple) -> tuple[str, str | None]:
    """An error's location as the job file spells it, and the tag of the union member it is in, if any: pydantic
    puts the tag in the location (`resources.rollout.engine.transformers.max_logprobs`), the job file has none."""
    parts, tag, section = [], None, JobConfig
    for part in loc:
        field = section.model_fields.get(part) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None and part in _union_tags(section):
            tag, section = part, None
            continue
        parts.append(str(part))
        section = field.annotation if field is not None else None
    return ".".join(parts), tag


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for item in error.errors():
        key, tag = _as_written(item["loc"])
        key = key or "(top level)"
        if item["type"] == "extra_forbidden":
            member = f" for {tag!r}" if tag else ""
            lines.append(f"  {key}: unknown key{member} (check the spelling; `pear-ray config --reference` lists "
                         "every key)")
        elif not item["loc"]:  # a check across sections: the input is the whole job, not worth repeating
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_job(tree: dict[str, Any], source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a job YAML, apply `dotted.key=value` overrides in order, and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"job file {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"job file {path} must hold a mapping at the top level, not {type(tree).__name__}")
    for override in overrides:
        apply_override(tree, override)
    return parse_job(tree, str(path))


def dump_job(job: JobConfig, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so a run folder says how it was made."""
    Path(path).write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))

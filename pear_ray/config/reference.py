"""The config reference (docs/config.md), generated from the schema, so it cannot drift from the code: every section
a job can hold, with each key's dotted path, type, default and description.

Sections are found by walking JobConfig's fields: a field whose type is a section (a pydantic model) is a section
of its own, at its dotted place (a list of sections: its entries, at `place[]`); sibling fields of one section type
are documented once, under `parent.{a,b,c}`; a tagged union (rl.objective) is documented once per kind.
`pear-ray config --reference` prints it.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Tag
from pydantic.fields import FieldInfo

from pear_ray.config.job import JobConfig

PREAMBLE = """\
# Job config reference

Generated from the schema by `pear-ray config --reference > docs/config.md` (or `make docs`): a description is
changed in the code (pear_ray/config/, the objectives in pear_ray/objectives/, pear_ray/models/tiny.py), not here.

A job file is YAML holding these keys; any of them can be overridden on the command line as `dotted.key=value`
(the value read as YAML). A key the schema does not know is refused, naming it. In a key, `{a,b}` stands for each of
`a` and `b`, and `a[]` for each entry of the list `a`.
"""


@dataclass(frozen=True)
class SectionPlace:
    """A section type at its dotted place in a job (`kind`: its tag, for one kind of a tagged union)."""

    place: str
    model: type[BaseModel]
    kind: str | None = None

    def key(self, field: str) -> str:
        return f"{self.place}.{field}" if self.place else field

    @property
    def title(self) -> str:
        place = self.place or "top level"
        return f"{place} ({tag_field(self.model, self.kind)}: {self.kind})" if self.kind else place


def tag_field(model: type[BaseModel], tag: str) -> str:
    """The field that carries a tagged union's tag in one of its kinds (`kind` for objectives, `backend` for engine
    options): the one whose type is the literal tag."""
    return next(name for name, field in model.model_fields.items()
                if typing.get_origin(field.annotation) is Literal and typing.get_args(field.annotation) == (tag,))


def sections(model: type[BaseModel] = JobConfig, place: str = "", kind: str | None = None) -> Iterator[SectionPlace]:
    """Every section a job can hold, depth first in field order: `model` at `place`, then the sections its fields
    hold."""
    yield SectionPlace(place, model, kind)
    groups: dict[tuple, list[str]] = {}  # the section types of a field -> the sibling fields that have them
    for name, field in model.model_fields.items():
        listed = typing.get_origin(field.annotation) is list  # a list of sections: its entries, as `name[]`
        arms = section_arms(typing.get_args(field.annotation)[0] if listed else field.annotation)
        if arms:
            groups.setdefault(tuple(arms), []).append(f"{name}[]" if listed else name)
    for arms, names in groups.items():
        child = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
        child_place = f"{place}.{child}" if place else child
        for arm_kind, arm in arms:
            yield from sections(arm, child_place, arm_kind if len(arms) > 1 else None)


def section_arms(annotation: Any) -> list[tuple[str | None, type[BaseModel]]]:
    """The section types a field's annotation holds, each with its tag when it is one kind of a tagged union."""
    tag = None
    if typing.get_origin(annotation) is Annotated:
        tag = next((item.tag for item in annotation.__metadata__ if isinstance(item, Tag)), None)
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(tag, annotation)]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [arm for member in typing.get_args(annotation) for arm in section_arms(member)]
    return []


def type_text(annotation: Any) -> str:
    """A field's type as a job file writes it: `int`, `token | block`, `list[int]`, `str | null`, `section`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Literal:
        return " | ".join(value_text(value) for value in args)
    if origin in (Union, types.UnionType):
        arms = section_arms(annotation)
        if len(arms) > 1:
            return "section, by kind: " + " | ".join(kind for kind, _ in arms)
        return " | ".join(type_text(member) for member in args)
    if origin is tuple:
        return "[" + ", ".join(type_text(member) for member in args) + "]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_text(member) for member in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return annotation.__name__


CONSTRAINTS = {"gt": "> {}", "ge": ">= {}", "lt": "< {}", "le": "<= {}", "min_length": "length >= {}",
               "max_length": "length <= {}", "pattern": "matching `{}`"}


def constraint_text(field: FieldInfo) -> str:
    """The field's bounds, e.g. `> 0, <= 1`."""
    return ", ".join(text.format(value_text(getattr(item, name))) for item in field.metadata
                     for name, text in CONSTRAINTS.items() if getattr(item, name, None) is not None)


def value_text(value: Any) -> str:
    """A value as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if not isinstance(value, BaseModel):
        return f"`{value_text(value)}`"
    arms = section_arms(field.annotation)
    if len(arms) == 1:
        return "its section's defaults"
    tag = next(tag for tag, arm in arms if isinstance(value, arm))
    return f"{tag_field(type(value), tag)} `{tag}`, its defaults"


def cell(text: str) -> str:
    """Text that stays in its table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def section_text(section: SectionPlace) -> str:
    lines = [f"## {section.title}", ""]
    doc = section.model.__dict__.get("__doc__")  # its own, not a base class's
    if doc:
        lines += [" ".join(inspect.cleandoc(doc).split()), ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    fields = section.model.model_fields
    for name in sorted(fields, key=lambda name: not (section.kind and name == "kind")):  # a kind's tag first
        field = fields[name]
        kind = type_text(field.annotation)
        bounds = constraint_text(field)
        kind = f"`{kind}`" + (f", {bounds}" if bounds else "")
        lines.append(f"| `{section.key(name)}` | {cell(kind)} | {cell(default_text(field))} | "
                     f"{cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    """docs/config.md: the preamble, then one heading and one table per section."""
    return "\n".join([PREAMBLE, *(section_text(section) for section in sections())])

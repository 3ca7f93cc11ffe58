"""The API's job-settings schemas, generated from `disp.config`'s dataclasses: the same fields, defaults, help
texts and choices, and the dataclass's own checks run on every request. Nothing is written twice, so the
OpenAPI document, the CLI's flags and the library cannot drift apart."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator


def settings_model(cls: type) -> type[BaseModel]:
    """A strict pydantic model of the settings dataclass `cls` (nested dataclasses become nested models),
    named `<Name>Settings` for `<Name>Config`; validating one also constructs `cls`, so its checks apply."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help")
        if dataclasses.is_dataclass(default):
            nested = settings_model(type(default))
            fields[f.name] = (nested, Field(default_factory=nested, description=help_text))
            continue
        kind = Literal[f.metadata["choices"]] if "choices" in f.metadata else hints[f.name]
        fields[f.name] = (kind, Field(default, description=help_text))

    def check(self: BaseModel) -> BaseModel:
        cls(**self.model_dump())  # the dataclass's checks; their ValueError becomes a 422 naming the value
        return self

    return create_model(
        cls.__name__.removesuffix("Config") + "Settings",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__=(cls.__doc__ or "").split("\n")[0],
        __validators__={"check": model_validator(mode="after")(check)},
        **fields,
    )

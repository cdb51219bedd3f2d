"""The base of every config section: an unknown key, a NaN or inf value, or true/false where a number belongs
is an error that names the key (rather than a setting silently ignored or taken as 1, or a traceback deep in
the simulator or the service)."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator


def _leaves(annotation: Any) -> set[Any]:
    """The types an annotation is built of: int and float of `tuple[int, int] | None`."""
    args = get_args(annotation)
    return {annotation} if not args else set().union(*(_leaves(a) for a in args))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, dict) and any(_holds_bool(v) for v in value.values())


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        """A section whose keys are all commented out is null in YAML: the defaults, as an empty TOML table."""
        return {} if value is None else value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Also inside lists and tables (shape = [128, true] would be a detector of 128 x 1)."""
        if info.field_name is not None and _holds_bool(value):
            kinds = _leaves(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and (int in kinds or float in kinds):
                raise ValueError("a number is needed here, not true or false")
        return value

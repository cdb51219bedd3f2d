"""The base of every config section: an unknown key, or a NaN or inf value, is an error that names the key
(rather than a setting silently ignored, or a traceback deep in the simulator or the service)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

"""The `[serve]` config section: source, model, bank, batching, publishing, metrics and logging."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

"""The `[train]` config section: model, loss, mining, augmentation and optimiser settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

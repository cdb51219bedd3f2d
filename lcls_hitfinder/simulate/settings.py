"""The `[simulate]` config section: detector geometry, beam, hits and noise of simulated patterns."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SimulateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

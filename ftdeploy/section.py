"""The base of every config section: pydantic, unknown keys rejected, assignments validated. Its own
module on the base floor, so that a layer below the config (the data layer's ``DataConfig``) defines
its section without importing the config, which reads the tasks, which register datasets."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

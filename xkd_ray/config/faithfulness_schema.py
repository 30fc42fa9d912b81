"""The ``faithfulness:`` section: which images the perturbation metrics are measured on and
which of the costlier checks run (docs/FAITHFULNESS.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from xkd_ray.config.fields import Schema, Seed


class FaithfulnessConfig(Schema):
    """Deletion / insertion, ROAD and the randomisation checks read a stratified random sample of
    ``images`` of each val/test split (all of it when smaller), drawn with ``seed``: the same
    images for every student and the teacher. ``road_steps`` removal fractions per ROAD curve;
    ``road`` / ``mprt`` switch those checks off (their metrics are then empty)."""

    images: Annotated[int, Field(ge=2, le=100_000)] = 200
    seed: Seed = 0
    road: bool = True
    road_steps: Annotated[int, Field(ge=1, le=100)] = 5
    mprt: bool = True

    def cache_settings(self) -> dict[str, int | bool]:
        """What the teacher's cached val/test measurements depend on (part of their cache key)."""
        return {"images": self.images, "seed": self.seed, "road": self.road, "road_steps": self.road_steps}

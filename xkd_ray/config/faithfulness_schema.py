"""The ``faithfulness:`` section: which images the perturbation metrics are measured on and
which of the costlier checks run (docs/FAITHFULNESS.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from xkd_ray.config.fields import Schema, Seed


class FaithfulnessConfig(Schema):
    """Deletion / insertion, ROAD and the randomisation checks read a stratified random sample of
    ``images`` of each val/test split (all of it when smaller), drawn with ``seed``: the same
    images for every student and the teacher. ``road_steps`` removal fractions per ROAD curve.

    ``road``: on which split ROAD runs. ``test`` (default) measures it where results are reported
    (metrics.json's test split, the front, the benchmarks) and keeps it out of every search
    trial's validation pass: it costs ~10 s per split per student on 32 px digits (docs/FAITHFULNESS.md),
    about the time a trial trains. ``all`` adds val (needed to use a ROAD metric as a search
    objective), ``off`` drops it. ``mprt: false`` drops the randomisation cascade."""

    images: Annotated[int, Field(ge=2, le=100_000)] = 200
    seed: Seed = 0
    road: Literal["test", "all", "off"] = "test"
    road_steps: Annotated[int, Field(ge=1, le=100)] = 5
    mprt: bool = True

    @field_validator("road", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML 1.1 (PyYAML, ``--set``) reads a bare ``off`` as ``false``: that is what the user wrote."""
        return "off" if value is False else value

    def road_on(self, split: str) -> bool:
        return road_on(self.road, split)

    def not_measured(self, metric: str, split: str) -> str | None:
        """Why these settings leave ``metric`` unmeasured (None) on ``split``, else None: ROAD AUCs
        (``road_morf_*``, ``road_lerf_*``) need ``road_on(split)``, MPRT (``mprt_*``) needs ``mprt``.
        Read by name so that validating a space imports no metric code (torch)."""
        if metric.startswith(("road_morf_", "road_lerf_")) and not self.road_on(split):
            return f"is measured on {split} only with faithfulness.road: all (the base has {self.road!r})"
        if metric.startswith("mprt_") and not self.mprt:
            return "is not measured with faithfulness.mprt: false"
        return None

    def cache_settings(self) -> dict[str, int | bool | str]:
        """What the teacher's cached val/test measurements depend on (part of their cache key)."""
        return {"images": self.images, "seed": self.seed, "road": self.road, "road_steps": self.road_steps}


def road_on(road: str, split: str) -> bool:
    """Whether ROAD runs on ``split`` under the ``faithfulness.road`` setting ``road``."""
    return road == "all" or (road == "test" and split == "test")

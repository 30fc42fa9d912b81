"""The base every config model shares (strict, frozen, unknown keys refused) and the bounded
field types the sections are declared with; ``xkd_ray.config.schema`` re-exports them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from xkd_ray.config.registries import choice

# numpy/scikit-learn seeds must fit 32 bits (data adds up to 2 to its seed); torch's fit 64.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
# Upper bounds far beyond any real run, so that a typo (an extra digit, 1e308) is refused at load
# instead of allocating for hours or dividing by ~0 inside training.
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_WIDTH = 4_096
Epochs = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
LearningRate = Annotated[float, Field(gt=0, le=1e6)]  # 1e6 still trains (and diverges): the fault tests use it


def Choice(registry: dict[str, Any], field: str) -> Any:
    """A name of ``registry``, looked up when a config is validated (entries a plugin adds later count)."""
    return Annotated[str, AfterValidator(lambda value: choice(registry, field, value))]


class Schema(BaseModel):
    """Shared settings of every model.

    Build configs with ``from_dict``, ``with_overrides`` or ``load_config``: they turn pydantic's
    ``ValidationError`` into one ``XKDConfigError`` line. Calling a class directly (tests,
    ``DataConfig(image_size=16)``) raises the ``ValidationError`` itself (also a ``ValueError``).
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)
    where: ClassVar[str] = ""  # the prefix of its fields in error messages ("search")
    noun: ClassVar[str] = "key"  # what an unknown entry of this model is called

    @model_validator(mode="before")
    @classmethod
    def _read_yaml_keys(cls, raw: Any) -> Any:
        """YAML allows ``1: x`` (reported as an unknown key, not a crash) and an empty section
        ``distill:`` (None: the section's defaults)."""
        if not isinstance(raw, dict):
            return raw
        return {str(k): v for k, v in raw.items() if v is not None or cls.noun != "section"}


def rule(path: str, problem: str) -> ValueError:
    """A cross-field rule's failure; ``config_error`` prints it as is (it names its own field)."""
    return ValueError(f"{path}: {problem}")

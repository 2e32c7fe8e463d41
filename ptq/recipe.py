"""A quantization recipe: what to quantize to and how, built and validated once at the edge.

``Recipe`` holds the weight spec, the activation spec and the method chain with its options. The
command line (``ptq.config``) and Python (``Recipe.build`` or the constructor) make the same object;
everything below it (``ptq.api.quantize``, the pipeline, the methods, storage) receives it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ptq.errors import UserError
from ptq.methods import FULL_PRECISION, build_steps, parse_method
from ptq.methods.activations import QuantizeActivations
from ptq.quant.spec import ActSpec, FormatError, WeightSpec


class RecipeError(UserError):
    """The recipe cannot work; the message names the setting and the fix."""


SMOOTHQUANT_NEEDS_ACTIVATIONS = (
    "smoothquant moves outliers from activations into weights, which only helps when activations are "
    "quantized: set an activation format (e.g. scheme=w8a8 or scheme=fp8)"
)


@dataclass(frozen=True)
class Recipe:
    """method: ``none`` (full precision) or steps joined by '+', e.g. ``awq+gptq``; weights: None only
    for full precision; activations: None = weights only; options: ``{step: {option: value}}``."""

    method: str = "rtn"
    weights: WeightSpec | None = field(default_factory=WeightSpec)
    activations: ActSpec | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            steps = parse_method(self.method)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        unknown = set(self.options) - set(steps)
        if unknown:
            raise RecipeError(f"method options for {sorted(unknown)} given, but method={self.method!r}")
        if not steps:
            if self.activations is not None:
                raise RecipeError("activation quantization needs quantized weights: choose a method (e.g. rtn)")
            object.__setattr__(self, "weights", None)
            return
        if self.weights is None:
            raise RecipeError(f"method={self.method} needs a weight format (weights=WeightSpec(...))")
        if self.activations is not None:
            self.activations.check_weights(self.weights)
        elif "smoothquant" in steps:
            raise RecipeError(SMOOTHQUANT_NEEDS_ACTIVATIONS)
        self.build_steps()  # every step's own option checks, before any work

    @classmethod
    def build(
        cls,
        method: str = "rtn",
        format: str = "int",
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        act_format: str | None = None,
        act_bits: int | None = None,
        act_granularity: str | None = None,
        options: dict | None = None,
    ) -> Recipe:
        """A recipe from loose settings, each unset one at its format's default (``WeightSpec.build``).
        ``act_bits`` alone means integer activations; ``act_format`` alone, that format's width."""
        if method == FULL_PRECISION:  # weight settings do not apply (sweeps pair none with any); these would
            if act_format is not None or act_bits is not None:
                raise RecipeError("activation quantization needs quantized weights: choose a method (e.g. rtn)")
            return cls(FULL_PRECISION, None, None, dict(options or {}))
        weights = WeightSpec.build(format, bits, group_size, sym)
        activations = None
        if act_format is not None or act_bits is not None:
            activations = ActSpec.build(act_format or "int", act_bits, act_granularity)
        elif act_granularity is not None:
            raise FormatError(f"act_granularity={act_granularity} given without act_format (or act_bits)")
        return cls(method, weights, activations, dict(options or {}))

    @property
    def full_precision(self) -> bool:
        return self.weights is None

    @property
    def steps(self) -> list[str]:
        return parse_method(self.method)

    def build_steps(self) -> list:
        """Fresh method objects for one quantization run (they hold per-model state once prepared);
        the activation step follows the method's steps when activations are quantized."""
        if self.full_precision:
            return []
        try:
            steps = build_steps(self.method, self.weights, self.options)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        if self.activations is not None:
            steps.append(QuantizeActivations(self.activations))
        return steps

    def describe(self) -> str:
        if self.full_precision:
            return "full precision"
        text = f"{self.method} {self.weights.describe()}"
        return text + (f", activations {self.activations.describe()}" if self.activations else "")

    def to_dict(self) -> dict:
        """The recipe as a record stores it (top-level fields of ``result.json``)."""
        return {"method": self.method, **spec_fields(self.weights, self.activations)}


def spec_fields(w: WeightSpec | None, a: ActSpec | None) -> dict:
    """Weight and activation specs as a record's top-level fields (bits 16 for full precision)."""
    return {
        "format": w.format if w else None,
        "bits": w.bits if w else 16,
        "group_size": w.group_size if w else None,
        "sym": w.sym if w else None,
        "act_format": a.format if a else None,
        "act_bits": a.bits if a else None,
        "act_granularity": a.granularity if a else None,
    }

"""A quantization recipe: what to quantize to and how, built and validated once at the edge.

``Recipe`` holds the weight spec, the activation spec and the method chain with its options. The
command line (``ptq.config``) and Python (``Recipe.build`` or the constructor) make the same object;
everything below it (``ptq.api.quantize``, the pipeline, the methods, storage) receives it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ptq.errors import UserError
from ptq.methods import FULL_PRECISION, METHODS, build_steps, parse_method
from ptq.methods.activations import QuantizeActivations, QuantizeKV
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
    for full precision (or a rotation alone); activations: None = weights only; kv: the KV cache's format
    (keys and values per head and token), None = 16 bits; options: ``{step: {option: value}}``."""

    method: str = "rtn"
    weights: WeightSpec | None = field(default_factory=WeightSpec)
    activations: ActSpec | None = None
    options: dict = field(default_factory=dict)
    kv: WeightSpec | None = None

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
            if self.kv is not None:
                raise RecipeError("KV-cache quantization needs a method (e.g. rtn, or quarot bits=16)")
            object.__setattr__(self, "weights", None)
            return
        check_rotation_chain(steps)
        if self.weights is None:
            if not all(METHODS[s].rotates_without_weights for s in steps):
                raise RecipeError(f"method={self.method} needs a weight format (weights=WeightSpec(...))")
            if self.activations is not None:
                raise RecipeError("activation quantization needs quantized weights: set bits below 16")
            self.build_steps()
            return
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
        kv_format: str | None = None,
        kv_bits: int | None = None,
    ) -> Recipe:
        """A recipe from loose settings, each unset one at its format's default (``WeightSpec.build``).
        ``act_bits`` alone means integer activations; ``act_format`` alone, that format's width."""
        kv = None
        if kv_format is not None or kv_bits is not None:
            kv = kv_spec(kv_format or "int", kv_bits)
        if method == FULL_PRECISION:  # weight settings do not apply (sweeps pair none with any); these would
            if act_format is not None or act_bits is not None:
                raise RecipeError("activation quantization needs quantized weights: choose a method (e.g. rtn)")
            if kv is not None:
                raise RecipeError("KV-cache quantization needs a method (e.g. rtn, or quarot bits=16)")
            return cls(FULL_PRECISION, None, None, dict(options or {}))
        if bits == 16:
            try:
                rotation_only = all(METHODS[s].rotates_without_weights for s in parse_method(method))
            except ValueError as err:
                raise RecipeError(str(err)) from None
            if not rotation_only:
                raise RecipeError(
                    "bits=16 is not a quantized format: use method=none for full precision (or method=quarot "
                    "bits=16 for the rotated, unquantized model)"
                )
            return cls(method, None, None, dict(options or {}), kv)
        weights = WeightSpec.build(format, bits, group_size, sym)
        activations = None
        if act_format is not None or act_bits is not None:
            activations = ActSpec.build(act_format or "int", act_bits, act_granularity)
        elif act_granularity is not None:
            raise FormatError(f"act_granularity={act_granularity} given without act_format (or act_bits)")
        return cls(method, weights, activations, dict(options or {}), kv)

    @property
    def full_precision(self) -> bool:
        return self.method == FULL_PRECISION

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
        if self.kv is not None:
            steps.append(QuantizeKV(self.kv, rotate=self.steps[0] == "quarot"))
        return steps

    def describe(self) -> str:
        if self.full_precision:
            return "full precision"
        text = f"{self.method} (unquantized)" if self.weights is None else f"{self.method} {self.weights.describe()}"
        text += f", activations {self.activations.describe()}" if self.activations else ""
        return text + (f", KV cache {self.kv.describe()}" if self.kv else "")

    def to_dict(self) -> dict:
        """The recipe as a record stores it (top-level fields of ``result.json``)."""
        return {"method": self.method, **spec_fields(self.weights, self.activations, self.kv)}


ROTATION_FIRST = (
    "quarot rotates the whole model, so it comes first and is followed by rtn or gptq (method=quarot+rtn, "
    "quarot+gptq) or by nothing"
)


def check_rotation_chain(steps: list[str]) -> None:
    """QuaRot first; AWQ and SmoothQuant do not compose with it: their up -> down scaling would have to
    pass through the online Hadamard on down_proj's input."""
    if "quarot" not in steps:
        return
    if steps[0] != "quarot" or steps.count("quarot") > 1 or any(s in ("awq", "smoothquant") for s in steps):
        raise RecipeError(f"method={'+'.join(steps)}: {ROTATION_FIRST}")


def kv_spec(format: str, bits: int | None) -> WeightSpec:
    """The KV cache's spec over rows of head_dim: integers asymmetric with one scale per (head, token) row
    (QuaRot's), float formats per row or in their blocks."""
    if format == "int":
        return WeightSpec.build("int", bits, -1, False)
    return WeightSpec.build(format, bits)


def spec_fields(w: WeightSpec | None, a: ActSpec | None, kv: WeightSpec | None = None) -> dict:
    """Weight, activation and KV-cache specs as a record's top-level fields (bits 16 for full precision)."""
    return {
        "format": w.format if w else None,
        "bits": w.bits if w else 16,
        "group_size": w.group_size if w else None,
        "sym": w.sym if w else None,
        "act_format": a.format if a else None,
        "act_bits": a.bits if a else None,
        "act_granularity": a.granularity if a else None,
        "kv_format": kv.format if kv else None,
        "kv_bits": kv.bits if kv else None,
    }

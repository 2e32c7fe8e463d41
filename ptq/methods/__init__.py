"""Registry of methods. A method name may chain steps with '+', e.g. ``awq+gptq``."""

from __future__ import annotations

import inspect

from ptq.methods.aqlm import AQLM
from ptq.methods.awq import AWQ
from ptq.methods.base import Method
from ptq.methods.gptq import GPTQ
from ptq.methods.quarot import QuaRot
from ptq.methods.rtn import RTN
from ptq.methods.smoothquant import SmoothQuant
from ptq.methods.spqr import SpQR
from ptq.quant import WeightSpec

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (RTN, GPTQ, AWQ, SmoothQuant, QuaRot, SpQR, AQLM)}
FULL_PRECISION = "none"


def method_names() -> list[str]:
    return [FULL_PRECISION, *sorted(METHODS)]


def parse_method(method: str) -> list[str]:
    """Step names of a method string; raises ValueError naming the valid ones."""
    if method == FULL_PRECISION:
        return []
    steps = method.split("+")
    unknown = [s for s in steps if s not in METHODS]
    if unknown or not steps:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(method_names())} (steps may be chained with '+')"
        )
    return steps


def build_steps(method: str, spec: WeightSpec | None, options: dict | None = None) -> list[Method]:
    """Instantiate the steps of ``method``; ``options[step]`` holds keyword options of each step."""
    options = options or {}
    names = parse_method(method)
    extra = set(options) - set(names)
    if extra:
        raise ValueError(f"options given for {sorted(extra)}, which are not steps of method {method!r}")
    for name in names:
        accepted = set(inspect.signature(METHODS[name].__init__).parameters) - {"self", "spec"}
        unknown = set(options.get(name, {})) - accepted
        if unknown:
            raise ValueError(
                f"method.{name} has no option(s) {sorted(unknown)}; its options are {', '.join(sorted(accepted))}"
            )
    steps = [METHODS[name](spec, **options.get(name, {})) for name in names]
    for step in steps[:-1]:
        if not step.transform:
            transforms = sorted(name for name, cls in METHODS.items() if cls.transform)
            raise ValueError(
                f"method {method!r}: {step.name!r} rounds the weights, so it can only be the last step; "
                f"steps before the last must be transforms ({', '.join(transforms)}), e.g. awq+gptq"
            )
        step.round_weights = False  # the last step quantizes the weights
    return steps


__all__ = ["FULL_PRECISION", "METHODS", "Method", "build_steps", "method_names", "parse_method"]

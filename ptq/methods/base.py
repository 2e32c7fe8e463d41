"""The interface a quantization method implements. Methods know nothing about Hydra or files."""

from __future__ import annotations

from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec


class Method:
    """One step of a method: quantizes (or transforms) one decoder block at a time, in place.

    ``needs_calibration``: whether ``quantize_block`` runs the block on calibration inputs
    (``ctx.forward()``); when no step needs it, the pipeline skips capturing inputs entirely.
    ``transform``: the step rescales/clips weights (AWQ, SmoothQuant) and rounds them itself only
    when it is the last step; in ``awq+gptq`` the later step does the rounding (``round_weights``).
    """

    name = "base"
    needs_calibration = False
    transform = False
    rotates_without_weights = False  # may run with no weight format (bits=16): it only transforms
    installs_input_stages = False  # puts run-time quantizers on linears' inputs (ptq.quant.activations)

    def __init__(self, spec: WeightSpec, **options) -> None:
        if options:
            raise ValueError(f"method {self.name!r} has no options {sorted(options)}")
        self.spec = spec
        self.round_weights = True

    def prepare(self, config) -> None:
        """Check that the model (its HF config) suits this step, before any heavy work."""

    def transform_model(self, model) -> dict | None:
        """The model-level stage: runs once, before block 0's inputs are captured (rotations change the
        embedding and the head here); returns what the run's record should say of it, if anything."""

    def quantize_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def restore_block(self, ctx: BlockContext) -> None:
        """A resumed run: the block's tensors and report (``ctx.stats``) are back as this step left them;
        reinstall what is not a tensor of the block (run-time quantizers, online rotations)."""

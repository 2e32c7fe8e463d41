"""The Python entry point: ``ptq.quantize(model, recipe, calib=...)`` on a loaded model.

Like torchao's ``quantize_(model, config)``: the recipe (``ptq.recipe.Recipe``) says what to quantize
to and how; ``quantize(model, method="gptq", bits=4, ...)`` builds one from keywords.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.errors import UserError
from ptq.pipeline import run_blocks
from ptq.quant.pack import StorageCount
from ptq.recipe import Recipe


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``: the first GPU if there is one, else the CPU; ``cuda:N`` a given GPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={device} was asked for, but torch sees no CUDA device; use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def join_ranks(device: str | torch.device | None) -> tuple[int, int, torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment): join the process group (NCCL on GPUs, gloo on the
    CPU) if the caller has not, and give each local rank its own GPU (``device=auto`` or ``cuda``: cuda:LOCAL_RANK).
    Returns (rank, world size, device); (0, 1, the device) in a single process."""
    import os

    import torch.distributed as dist

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == 1 and not dist.is_initialized():
        return 0, 1, resolve_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device) in ("auto", "cuda", "None") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def leave_ranks() -> None:
    """The end of a torchrun process: leave the process group cleanly (NCCL warns otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare_steps(recipe: Recipe, config) -> list:
    """The recipe's steps, checked against the model's config (architecture table entries), before any
    heavy work: each step's ``prepare`` runs here, once."""
    steps = recipe.build_steps()
    for step in steps:
        step.prepare(config)
    return steps


def run_steps(
    model: nn.Module,
    steps: list,
    calib: torch.Tensor | None = None,
    device: torch.device | None = None,
    offload: bool = False,
    batch_size: int = 8,
    on_quantized=None,
    lazy=None,
    on_block_done=None,
    progress=None,
    experts=None,
    activations: str = "auto",
) -> dict:
    """Run prepared steps (``prepare_steps``) through the block pipeline; returns its report with
    the stored size of the result (``storage``)."""
    storage = StorageCount()
    if not steps:
        return {"blocks": [], "capture_s": 0.0, "storage": storage.summary(model)}

    def record(name, qweight) -> None:
        storage.add(name, qweight)
        if on_quantized is not None:
            on_quantized(name, qweight)

    report = run_blocks(
        model, steps, calib, resolve_device(device), offload, batch_size, record, lazy, on_block_done, progress,
        experts, activations,
    )  # fmt: skip
    report["storage"] = storage.summary(model)
    return report


def quantize(
    model: nn.Module,
    recipe: Recipe | None = None,
    calib: torch.Tensor | None = None,
    device: str | torch.device | None = "auto",
    offload: bool = False,
    batch_size: int = 8,
    on_quantized=None,
    lazy=None,
    on_block_done=None,
    experts=None,
    activations: str = "auto",
    **settings,
) -> dict:
    """Quantize a Hugging Face causal LM in place, block by block; returns the pipeline's report.

    ``recipe``: a ``Recipe``; or keywords that build one (``Recipe.build``): ``method``, ``format``,
    ``bits``, ``group_size``, ``sym``, ``act_format``, ``act_bits``, ``act_granularity``, ``options``
    (per-step options, e.g. ``{"gptq": {"act_order": False}}``).
    ``calib``: token ids [nsamples, seqlen] for methods that need calibration data (e.g. GPTQ). Inside an
    initialized ``torch.distributed`` process group (torchrun) every rank passes the same ``calib``; each rank
    calibrates on its share of the windows and every statistic is summed (or maximized) over the ranks, so all
    ranks end with the same quantized model (``ptq/methods/stats.py``).
    With ``offload`` the model stays where it is and only the current block visits ``device``.
    The report's ``storage`` gives the bytes and effective bits per weight as the format stores them.
    ``on_quantized(name, QuantizedWeight)`` also receives every quantized linear, and
    ``on_block_done(prefix, block)`` each finished block: a store (``CompressedStore``, ``PackedStore``)
    takes both (``store.add``, ``store.block_done``) and writes the checkpoint as blocks finish, then
    ``store.save(model, tokenizer)`` writes the rest. ``lazy``: a ``ptq.lazy.LazyModel`` whose blocks
    are read from the checkpoint one at a time (needs ``offload``). ``experts``: a ``ptq.moe.MoEPolicy``
    for mixture-of-experts models (``calibrate_all_experts``, ``min_tokens``). ``activations``: where the
    calibration activations live: ``auto`` (host memory with ``offload``, else the device), ``host`` or ``device``.
    """
    if recipe is None:
        recipe = Recipe.build(**settings)
    elif settings:
        raise UserError(f"give either a recipe or settings, not both (got a recipe and {sorted(settings)})")
    steps = prepare_steps(recipe, model.config)
    return run_steps(
        model, steps, calib, device, offload, batch_size, on_quantized, lazy, on_block_done, experts=experts,
        activations=activations,
    )  # fmt: skip

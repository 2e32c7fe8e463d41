"""The sequential block executor: every method runs through here, one decoder block at a time.

    capture the inputs of block 0 (hidden states + the keyword arguments the block needs)
    for each block: move it to the compute device
                    each method step quantizes it, running it over the calibration inputs as needed
                    run the quantized block to get the next block's inputs
                    move it back when offloading

Calibration activations are kept in chunks of ``batch_size`` windows, on the compute device, or in
(pinned) host memory when offloading, and streamed to the device chunk by chunk.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq import block_parts, moe
from ptq.bars import Bar
from ptq.errors import UserError
from ptq.models import (
    ResidualBlock,
    block_layout,
    embedding_modules,
    get_arch,
    get_blocks,
    get_weight,
    head_modules,
    residual_block,
    set_weight,
)
from ptq.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def _slice_batch(value, n: int, captured: int):
    """Cut batch-sized tensors in captured kwargs down to a smaller last chunk."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == captured and n != captured:
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_slice_batch(v, n, captured) for v in value)
    return value


@dataclass
class BlockInputs:
    """Hidden states entering a block (a list of chunks) and the kwargs each block call needs."""

    chunks: list[torch.Tensor]
    kwargs: dict
    captured_batch: int
    # whether every chunk is finite: one flag, computed where the chunks were computed (on the GPU when
    # offloading, so no pass over host memory) and read once (``check_finite_activations``)
    finite: torch.Tensor | None = None

    def kwargs_for(self, chunk: torch.Tensor) -> dict:
        n = chunk.shape[0]
        return {k: _slice_batch(v, n, self.captured_batch) for k, v in self.kwargs.items()}


def _to_store(x: torch.Tensor, store: torch.device) -> torch.Tensor:
    if store.type == "cpu" and x.device.type == "cuda":
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x, non_blocking=True)
        return out
    return x.to(store)


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device):
    """Temporarily move ``modules`` to ``device``; each goes back where it was afterwards."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int, store: torch.device
) -> BlockInputs:
    """Run the model up to block 0 and keep what block 0 receives, for every calibration window."""
    first = get_blocks(model)[0]
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    chunks, kwargs, flags = [], None, []
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with on_device(embedding_modules(model), device):
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                flags.append(torch.isfinite(captured["hidden"]).all())
                chunks.append(_to_store(captured["hidden"], store))
                kwargs = kwargs if kwargs is not None else captured["kwargs"]
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return BlockInputs(chunks, kwargs, min(batch_size, input_ids.shape[0]), torch.stack(flags).all())


def prefetched(chunks: list[torch.Tensor], device: torch.device):
    """Yield (chunk, chunk on ``device``). Host chunks bound for a GPU are copied on a side stream, the
    next one while the caller computes with the current one, so that with offloading the transfers
    (~2 GB of activations per pass for an 8B model at 128 x 2048 tokens) overlap the block's compute."""
    if device.type != "cuda" or not chunks or chunks[0].device.type != "cpu":
        for chunk in chunks:
            yield chunk, chunk.to(device, non_blocking=True)
        return
    compute, copier = torch.cuda.current_stream(device), torch.cuda.Stream(device)

    def start(chunk: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(copier):
            return chunk.to(device, non_blocking=True)

    upcoming = start(chunks[0])
    for i, chunk in enumerate(chunks):
        compute.wait_stream(copier)  # this chunk has arrived
        current = upcoming
        current.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        if i + 1 < len(chunks):
            upcoming = start(chunks[i + 1])
        yield chunk, current


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockContext:
    """What a method sees of one block: its linears, and a way to run it on the calibration inputs."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Module]  # name -> linear, in true-sequential order
    stages: tuple[tuple[tuple[str, ...], ...], ...]  # groups sharing an input, by forward pass (models.block_layout)
    inputs: BlockInputs | None  # None when no step needs calibration data
    device: torch.device
    min_tokens: int = 1  # a linear whose statistics saw fewer tokens is rounded to nearest (MoE experts)
    stats: dict = field(default_factory=dict)  # what the steps report, per layer
    timings: dict = field(default_factory=dict)  # seconds per phase (e.g. hessian_s, solve_s), summed
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # integer weights, by linear name
    peak_gpu_bytes: dict = field(default_factory=dict)  # CUDA: highest allocation so far, at each phase's end
    moe: dict | None = None  # a MoE block's expert accounting (ptq.moe.summary)
    # the block's parts between its linears (``models.residual_block``), for running it from the middle
    # (``ptq.block_parts``); set while the block's last step runs, None where that may not be done
    parts: ResidualBlock | None = None
    kept: block_parts.Kept | None = field(default=None, repr=False)  # what the last statistics pass kept
    continued: int = 0  # passes (and the propagation) that continued from what a pass kept

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        """Names grouped by the input they share, in data-flow order."""
        return tuple(group for stage in self.stages for group in stage)

    def set_quantized(self, name: str, qweight: QuantizedWeight) -> None:
        """Give linear ``name`` its quantized weight: the dequantized values (in the weight's dtype)
        for computing, the codes and group parameters for storage (packing, effective bits)."""
        linear = self.linears[name]
        set_weight(linear, qweight.dequantize().to(get_weight(linear).dtype))
        self.quantized[name] = qweight
        if self.kept is not None and name not in self.kept.may_change:
            self.kept = None  # what was kept came from the block before this change

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        if self.device.type == "cuda":  # shows in which phase the GPU memory peak is reached
            self.peak_gpu_bytes[phase] = torch.cuda.max_memory_allocated(self.device)

    def chunks(self, max_tokens: int | None = None) -> list[torch.Tensor]:
        """The stored calibration chunks; with ``max_tokens`` only the first ones, as many as hold at
        most that many tokens (at least one)."""
        if self.inputs is None:
            raise RuntimeError("this block has no calibration inputs: the step must set needs_calibration")
        chosen, tokens = [], 0
        for chunk in self.inputs.chunks:
            tokens += chunk.shape[0] * chunk.shape[1]
            if max_tokens is not None and tokens > max_tokens and chosen:
                break
            chosen.append(chunk)
        return chosen

    @torch.no_grad()
    def _each_chunk(self, stop_early: bool = False, max_tokens: int | None = None):
        """Run the block on every calibration chunk; yields (stored chunk, block output or None).
        With ``stop_early`` a hook may raise _StopForward to skip the rest of a chunk's forward.
        ``max_tokens``: only the first chunks (see ``chunks``)."""
        self.kept = None  # a new pass: whatever an earlier one kept may be out of date
        for chunk, hidden in prefetched(self.chunks(max_tokens), self.device):
            try:
                yield chunk, _run(self.block, hidden, self.inputs.kwargs_for(hidden))
            except _StopForward:
                if not stop_early:
                    raise
                yield chunk, None

    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block over every calibration chunk (hooks registered by a method see each call)."""
        outputs = [_to_store(out, chunk.device) for chunk, out in self._each_chunk() if keep_outputs]
        return outputs if keep_outputs else None

    def propagate(self) -> BlockInputs:
        """The next block's inputs: this block run over every calibration chunk, each output written over its
        input chunk (same shape and dtype), so no second set of activations is allocated (on the GPU, or as
        new page-locked host buffers when offloading). The inputs are gone afterwards. Where the last
        statistics pass stopped at the last linear's input and kept it (``forward_with_input_hooks``), the
        block is finished from there instead of run again."""
        chunks, flags = [], []
        kept, self.kept = self.kept, None
        if kept is not None and kept.point == block_parts.OUTPUT:
            outputs = block_parts.block_outputs(self.parts, self.block, kept)
            self.continued += 1
        else:
            outputs = self._each_chunk()
        for chunk, out in outputs:
            flags.append(torch.isfinite(out).all())
            if out.shape == chunk.shape and out.dtype == chunk.dtype:
                chunks.append(chunk.copy_(out, non_blocking=True))
            else:
                chunks.append(_to_store(out, chunk.device))
        if self.device.type == "cuda":  # host chunks are read next (by the CPU too): the copies must have landed
            torch.cuda.current_stream(self.device).synchronize()
        finite = torch.stack(flags).all() if flags else None
        return BlockInputs(chunks, self.inputs.kwargs, self.inputs.captured_batch, finite)

    def _can_keep(self, point: str | None) -> bool:
        """Whether a pass that stops at ``point`` may keep its tensors: the chunks are on the compute device
        (offloading keeps nothing more there) and the tensors fit in its free memory, with room to spare."""
        chunks = self.inputs.chunks
        if point is None or not chunks or any(chunk.device.type != self.device.type for chunk in chunks):
            return False
        need = block_parts.kept_bytes(self.parts, point, self.block, chunks)
        return need + max(2 << 30, need // 10) <= free_memory(self.device)

    def capture_calls(self, module: nn.Module, max_tokens: int | None = None) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) with which the block calls ``module``, one per calibration chunk (up to
        ``max_tokens`` tokens), kept on the compute device; each chunk's forward stops there. Calling
        ``module(*args, **kwargs)`` again reproduces that part of the block (AWQ compares such outputs)."""
        calls = []

        def capture(_module, args, kwargs):
            calls.append((args, dict(kwargs)))
            raise _StopForward

        handle = module.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for _ in self._each_chunk(stop_early=True, max_tokens=max_tokens):
                pass
        finally:
            handle.remove()
        return calls

    def forward_with_input_hooks(
        self, modules: dict[str, nn.Module], on_input, max_tokens: int | None = None, keep: bool = False
    ) -> None:
        """Run the block over the calibration inputs (up to ``max_tokens`` tokens, see ``chunks``),
        calling ``on_input(name, x)`` with the input of each listed module (x: [batch, seq, features]).
        Each chunk's forward stops as soon as every listed module has seen its input: the rest of the
        block is not needed for these statistics.

        ``keep``: before its next pass the caller changes no weight but those of the listed module's group
        (GPTQ's true-sequential stages). Where the block's parts are known (``parts``) and the pass stops at a
        point the block can be continued from, the pass keeps what it computed, and the next one (or
        ``propagate``) continues from there instead of starting over (``ptq.block_parts``)."""
        kept, self.kept = self.kept, None
        names = list(modules)
        point = None
        if keep and self.parts is not None and max_tokens is None:
            point = block_parts.stop_point(self.parts, names)
        keeping = self._can_keep(point)
        firsts, seconds = [], []
        if point is not None and kept is not None and block_parts.can_continue(kept, point):
            self.continued += 1
            stored = []
            for chunk, first, second in block_parts.continued(self.parts, self.block, kept):
                on_input(names[0], second)
                if keeping:
                    stored.append(chunk)
                    firsts.append(first)
                    seconds.append(second)
        else:
            to_keep = point if keeping else None
            stored = self._pass_with_input_hooks(modules, on_input, max_tokens, to_keep, firsts, seconds)
        if keeping and len(firsts) == len(seconds) == len(stored):
            group = next(group for group in self.sequential if names[0] in group)
            self.kept = block_parts.Kept(point, list(zip(stored, firsts, seconds, strict=True)), frozenset(group))

    def _pass_with_input_hooks(self, modules, on_input, max_tokens, point, firsts: list, seconds: list) -> list:
        """A pass from the block's start for ``forward_with_input_hooks``; where ``point`` is given, the tensors
        to keep go into ``firsts`` and ``seconds``. Returns the stored chunks it ran."""
        seen: set[str] = set()

        def hook(name):
            def capture(_module, args):
                on_input(name, args[0])
                if point is not None:
                    seconds.append(args[0])
                seen.add(name)
                if len(seen) == len(modules):
                    seen.clear()
                    raise _StopForward

            return capture

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
        if point is not None:
            handles.append(block_parts.keeping_hook(self.parts, point, self.block, firsts))
        try:
            return [chunk for chunk, _ in self._each_chunk(stop_early=True, max_tokens=max_tokens)]
        finally:
            for handle in handles:
                handle.remove()


class NonFiniteError(UserError):
    """Infinities or NaNs in a weight or an activation: named by block and layer, before anything is kept."""


def check_finite_weights(linears: dict[str, nn.Module], prefix: str) -> None:
    for name, linear in linears.items():
        weight = get_weight(linear)
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise NonFiniteError(
                f"{prefix}.{name}.weight holds {bad} non-finite values (inf/NaN) before quantization: the checkpoint "
                "is corrupt or overflowed when it was converted; check the model files (or model.dtype)"
            )


def check_finite_activations(inputs: BlockInputs, where: str) -> None:
    if inputs.finite is not None and not inputs.finite:  # one sync
        raise NonFiniteError(
            f"{where} produced non-finite activations (inf/NaN) on the calibration data: in fp16 this is often "
            "an overflow; try model.dtype=bfloat16 or float32"
        )


def check_all_quantized(ctx: BlockContext, prefix: str) -> None:
    """Once any linear of a block is quantized, all are: none (an expert that saw no token, say) may stay
    in full precision unnoticed."""
    left = [name for name in ctx.linears if name not in ctx.quantized]
    if ctx.quantized and left:
        raise RuntimeError(f"{prefix}: the steps left {len(left)} linear(s) unquantized, e.g. {left[0]}")


def available_host_bytes() -> int | None:
    """The host memory the system says is available (Linux's MemAvailable); None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no estimate
        return None


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory plus what PyTorch's caching
    allocator holds unused; on the CPU the available host memory (0 where the system does not say)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_host_bytes() or 0


def _quantize_block(ctx: BlockContext, steps: list, prefix: str) -> None:
    check_finite_weights(ctx.linears, prefix)
    parts = ctx.parts
    for step in steps:
        # only the last step may keep what a pass computed: a later one would change the block under it
        ctx.parts = parts if step is steps[-1] else None
        step.quantize_block(ctx)
    check_all_quantized(ctx, prefix)


def _restore_block(ctx: BlockContext, steps: list, progress) -> dict:
    """Block ``ctx.index`` as an interrupted run saved it; returns its report entry."""
    quantized, entry = progress.restore_block(ctx.index, ctx.block, ctx.device)
    ctx.stats = entry["layers"]
    for name, qweight in quantized.items():
        if name in ctx.linears:
            ctx.set_quantized(name, qweight)
        else:  # an expert, restored in the model's fused parameters
            ctx.quantized[name] = qweight
    for step in steps:
        step.restore_block(ctx)
    return entry


ACTIVATION_PLACES = ("auto", "host", "device")


def activation_store(activations: str, offload: bool, device: torch.device) -> torch.device:
    """Where the calibration activations live: ``host`` (streamed to ``device`` chunk by chunk), ``device``, or
    ``auto``: in host memory when offloading, else on the device. On the device they cost no transfers, and
    GPTQ's passes can continue from one another (``ptq.block_parts``)."""
    if activations not in ACTIVATION_PLACES:
        raise UserError(f"activations={activations!r} is unknown; choose one of {', '.join(ACTIVATION_PLACES)}")
    if activations == "auto":
        activations = "host" if offload else "device"
    return torch.device("cpu") if activations == "host" else device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    steps: list,
    calib_ids: torch.Tensor | None,
    device: torch.device,
    offload: bool,
    batch_size: int = 8,
    on_quantized=None,
    lazy=None,
    on_block_done=None,
    progress=None,
    experts: moe.MoEPolicy | None = None,
    activations: str = "auto",
) -> dict:
    """Quantize ``model`` in place, block by block, with each step in ``steps`` in order (steps
    already prepared for this model: ``ptq.api.prepare_steps``).

    Returns timings and what each step reported per block. With ``offload`` only the current block
    (and, during input capture, the embeddings) is on ``device``; otherwise the whole model is moved.
    ``on_quantized(qualified_name, QuantizedWeight)`` is called for every linear a step quantized,
    once its block is done (storage accounting, packing for saving), then ``on_block_done(prefix, block)``
    with the finished block (a checkpoint writes it there and then). ``lazy`` (``ptq.lazy.LazyModel``,
    with ``offload``): blocks start on the meta device, are read from the checkpoint just before they
    are quantized and keep only packed integer weights afterwards. ``progress``
    (``ptq.storage.progress.Progress``): each finished block is saved there, and its first ``done``
    blocks are restored from it instead of quantized again (resume); they still run forward, which
    recomputes the calibration inputs of the next block. ``experts``: how a mixture-of-experts model's
    experts are calibrated (``ptq.moe.MoEPolicy``; its defaults when None). ``activations``: where the
    calibration activations live (``activation_store``).
    """
    if lazy is not None and not offload:
        raise ValueError("loading blocks lazily from the checkpoint needs offload=true")
    arch = get_arch(model)
    experts = experts or moe.MoEPolicy()
    # A MoE model whose linears get input quantizers keeps its experts split (ptq.moe): the quantizers
    # live on the experts' linears, which the fused layout does not have.
    keep_unfused = any(step.installs_input_stages for step in steps)
    blocks = get_blocks(model)
    needs_calibration = any(step.needs_calibration for step in steps)
    if needs_calibration and calib_ids is None:
        raise UserError(
            f"{'+'.join(s.name for s in steps)} needs calibration data: pass calib=<token ids [nsamples, seqlen]>"
        )
    from ptq.methods.stats import shard_windows, world  # (ptq.methods imports this module)

    _, ranks = world()
    if needs_calibration and ranks > 1:  # data-parallel: this rank's share of the windows (the statistics seam)
        calib_ids = shard_windows(calib_ids)
    if not offload:
        model.to(device)
    store = activation_store(activations, offload, device)
    report: dict = {"blocks": [], "capture_s": 0.0, "world_size": ranks}
    for step in steps:  # the model-level stage (rotations of the embedding and head), before any capture
        described = step.transform_model(model)
        if described:
            report.setdefault("model_stage", {})[step.name] = described

    inputs = None
    if needs_calibration:
        start = time.perf_counter()
        inputs = capture_block_inputs(model, calib_ids, device, batch_size, store)
        check_finite_activations(inputs, "the embeddings")
        _sync(device)
        report["capture_s"] = time.perf_counter() - start
        if device.type == "cuda":
            report["capture_peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)

    module_names = {id(m): name for name, m in model.named_modules()}
    with Bar(len(blocks), "quantizing", "block") as bar:
        for index, block in enumerate(blocks):
            start = time.perf_counter()
            if lazy is not None:
                lazy.load(block)
                if index + 1 < len(blocks):  # the next block's tensors are read while this one is quantized
                    lazy.read_ahead(blocks[index + 1])
            home = next(block.parameters()).device
            block.to(device)
            prefix = module_names[id(block)]
            restored = progress is not None and index < progress.done
            # Experts are split into linears while the block is quantized, and stay split where run-time
            # quantizers sit on their inputs (a restored block is put back as it was saved).
            stack = moe.unfuse(block, arch.experts, experts) if not restored or keep_unfused else None
            ctx = BlockContext(index, block, *block_layout(model, block), inputs, device, min_tokens=experts.min_tokens)
            # input quantizers change what the linears compute from their inputs, and hooks would be skipped:
            # then every pass runs the block from its start
            ctx.parts = None if keep_unfused or block_parts.has_hooks(block) else residual_block(arch)
            if restored:
                entry = _restore_block(ctx, steps, progress)
            else:
                _quantize_block(ctx, steps, prefix)
                if stack is not None:
                    ctx.moe = moe.summary(stack, arch.experts, ctx.stats)
                    if not keep_unfused:
                        moe.fuse(block, arch.experts, stack)
            if stack is not None and keep_unfused:
                stack.release_fused()
            if inputs is not None and index + 1 < len(blocks):
                inputs = ctx.propagate()
                check_finite_activations(inputs, f"block {index} ({prefix})")
            if on_quantized is not None:
                for name, qweight in ctx.quantized.items():
                    on_quantized(f"{prefix}.{name}", qweight)
            if on_block_done is not None:
                on_block_done(prefix, block)
            if progress is not None and not restored:
                _sync(device)
                entry = {"index": index, "seconds": time.perf_counter() - start, "timings": ctx.timings,
                         "peak_gpu_bytes": ctx.peak_gpu_bytes, "layers": ctx.stats, "moe": ctx.moe}  # fmt: skip
                progress.save_block(index, block, ctx.quantized, entry)
            if lazy is not None:
                lazy.pack_block(block, ctx.quantized)
            if offload:
                block.to(home)
            _sync(device)
            seconds = time.perf_counter() - start
            bar.step()
            if restored:
                report["blocks"].append({**entry, "restored_s": seconds})
                log.info("block %d/%d restored from %s in %.2f s (%s)", index + 1, len(blocks), progress.folder,
                         seconds, bar.eta())  # fmt: skip
                continue
            report["blocks"].append(
                {"index": index, "seconds": seconds, "timings": ctx.timings, "peak_gpu_bytes": ctx.peak_gpu_bytes,
                 "layers": ctx.stats, "moe": ctx.moe, "continued_passes": ctx.continued}
            )  # fmt: skip
            log.info("block %d/%d quantized in %.2f s (%s)", index + 1, len(blocks), seconds, bar.eta())
    return report


@torch.no_grad()
def blockwise_logits(model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int = 1, lazy=None):
    """Logits of an offloaded model, moving one block at a time to ``device`` (yields per chunk).

    Used to evaluate models that do not fit on the device: the same computation as model(input_ids).
    With ``lazy``, blocks still on the meta device are read from the checkpoint and released after use.
    """
    inputs = capture_block_inputs(model, input_ids, device, batch_size, torch.device("cpu"))
    blocks = get_blocks(model)
    with Bar(len(blocks), "evaluating (offloaded)", "block", quarters=True) as bar:
        for block in blocks:
            borrowed = lazy is not None and any(p.is_meta for p in block.parameters())
            if borrowed:
                lazy.load(block)
            home = next(block.parameters()).device
            block.to(device)
            ctx = BlockContext(-1, block, {}, (), inputs, device)
            inputs = ctx.propagate()
            block.to(home)
            if borrowed:
                lazy.release(block)
            bar.step()
    head = head_modules(model)
    with on_device(head, device):
        for chunk in inputs.chunks:
            hidden = chunk.to(device)
            for m in head:
                hidden = m(hidden)
            yield hidden

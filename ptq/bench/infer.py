"""``python -m ptq.bench.infer``: what real low-bit weights buy at inference, measured with real kernels.

On a random-weight model of a real shape (default Llama-3-8B, built on the GPU), for each format:

- bf16:  the unquantized model (cuBLAS bf16 matmuls)
- w8a8:  every block linear an ``Int8Linear`` (int8 weights per channel, int8 activations per token,
         ``torch._int_mm``)
- fp8:   every block linear an ``Fp8Linear`` (E4M3 weights per channel, E4M3 activations per token,
         ``torch._scaled_mm`` with row-wise scales on the FP8 tensor cores)
- w4a16: every block linear a ``QuantLinear`` (GPTQ layout, 4-bit asymmetric, group 128, from RTN) on
         ptq's Triton kernels (``ptq.quant.kernels``); ``w4a16-sym`` symmetric, ``w4a16-actorder`` with
         act-order's permuted groups, ``w4a16-tinygemm`` on PyTorch's int4 weight-only kernel instead
         (``aten._weight_int4pack_mm``, the library alternative)
- nvfp4, mxfp4: every block linear a ``CompactLinear`` (E2M1 nibbles, E4M3 / E8M0 block scales),
         weight-only, on the Triton kernels

it measures weight memory (all parameters and buffers), peak memory, prefill tokens/s (batch 1 x
2048; eager, and replayed from a CUDA graph: ``prefill_graphed_*``, the GPU's time alone, beside
``prefill_host_s``, the host's time to issue an eager prefill) and decode tokens/s (batch 1, 16, 64 and
``max``, the most sequences of ``--context`` tokens whose bf16 KV cache fits beside the weights; each after a
128-token prompt), as medians of ``--repeat`` timed runs after a
warm-up. Beside each decode rate: the share of the GPU's copy bandwidth (measured in the same run) that reading the
weights once per step needs at that rate (block linears and the LM head; the distance to the memory-bound limit).
``--price-per-gpu-hour`` adds the cost report (``ptq.bench.cost``). Embeddings and the LM head stay bf16 in every
format. Each block's q, k, v and gate, up are computed as one product each where the format's layers join
(``ptq.fuse``, as serving engines do; ``joined_groups`` in each row), and act-order layers store their inputs in
group order (``sorted_layers``); ``--no-fuse`` keeps the layers as stored.
Decode is measured twice: eager (each step launches every kernel from Python; at batch 1 that
overhead, ~30 ms per step for 32 layers, hides the kernels) and replayed from a CUDA graph with a
static KV cache (the kernels' own speed, as serving engines run them); with ``--compile`` a third time, the
step compiled by torch.compile (its elementwise kernels fused) and captured the same way; the prefill likewise
(``prefill_compiled_*``). Decode attention is ``ptq.attention``'s by default (the query heads that share a
key/value head attend as that head's queries, so the GQA cache is never copied: ``fused``, the default, through
ptq's kernel, which also rotates the new token and writes it into the cache; ``triton`` the kernel alone,
``packed`` through SDPA; ``--attention sdpa``: transformers' own, which copies it on a static cache), the same for
every format.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from ptq.attention import KINDS as ATTENTION_KINDS
from ptq.attention import use_decode_attention
from ptq.bench.cost import concurrent_sequences, kv_bytes_per_token
from ptq.bench.cost import report as cost_report
from ptq.bench.quant import SHAPES, build_model, command_line
from ptq.checkpoint import module_bytes
from ptq.fuse import fuse_projections, sort_act_order_groups
from ptq.models import block_linears, get_arch, get_blocks, get_weight
from ptq.quant import WeightSpec, kernels, quantize_weight, shared_tensor_scale
from ptq.quant import linear as quantized_linears
from ptq.quant.linear import QUANTIZED_LAYERS, CompactLinear, Fp8Linear, Int8Linear, QuantLinear
from ptq.quant.weight import QuantizedWeight
from ptq.results import environment

FORMATS = ("bf16", "w8a8", "fp8", "w4a16", "w4a16-sym", "w4a16-actorder", "w4a16-tinygemm", "nvfp4", "mxfp4")


def parse_formats(text: str) -> list[str]:
    """``--formats``: names from ``FORMATS``, comma-separated; an unknown one stops before any work."""
    formats = text.split(",")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return formats


def cuda_or_exit(program: str) -> torch.device:
    """The GPU a kernel benchmark measures on, or one sentence and exit where there is none."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{program} measures CUDA kernels: run it on a machine with a GPU")
    return torch.device("cuda")


def act_order_rtn(weight: torch.Tensor, spec: WeightSpec, seed: int = 0) -> QuantizedWeight:
    """RTN with groups over a random permutation of the columns: the layout GPTQ's act-order stores
    (g_idx not sorted), for measuring what act-order costs a kernel."""
    in_features = weight.shape[1]
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed)).to(weight.device)
    permuted = quantize_weight(weight[:, perm], spec)
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features, device=weight.device) // spec.group_size)[inverse].to(torch.int32)
    return QuantizedWeight(permuted.qweight[:, inverse].contiguous(), permuted.scale, permuted.zero, g_idx, spec)


def make_layer(fmt: str, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128,
               tensor_scale: torch.Tensor | None = None):  # fmt: skip
    """The layer a format computes with, from a bf16 weight [out, in] (RTN; ``tensor_scale``: NVFP4's global
    scale when shared with other linears)."""
    if fmt == "bf16":
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        return layer
    if fmt == "w8a8":
        return Int8Linear.from_weight(weight, bias)
    if fmt == "fp8":
        return Fp8Linear.from_weight(weight, bias)
    if fmt in ("nvfp4", "mxfp4"):
        return CompactLinear(quantize_weight(weight, WeightSpec.build(fmt), tensor_scale), bias, weight.dtype)
    if fmt.startswith("w4a16"):
        spec = WeightSpec("int", 4, group_size, fmt == "w4a16-sym")
        qw = act_order_rtn(weight, spec) if fmt == "w4a16-actorder" else quantize_weight(weight, spec)
        layer = QuantLinear.from_quantized(qw, bias, weight.dtype)
        if fmt == "w4a16-tinygemm":
            layer.use_int4_kernel()
        return layer
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


@torch.no_grad()
def convert(model, fmt: str, group_size: int = 128) -> None:
    """Replace every block linear, one at a time (the bf16 weight is freed as each is replaced)."""
    if fmt == "bf16":
        return
    for block in get_blocks(model):
        linears = block_linears(model, block)
        shared = shared_tensor_scales(model, linears, fmt)
        for name, linear in linears.items():
            block.set_submodule(name, make_layer(fmt, get_weight(linear), linear.bias, group_size, shared.get(name)))
            del linear
    torch.cuda.empty_cache()


def convert_and_join(model, fmt: str, join: bool = True) -> tuple[int, int]:
    """``convert``, then the layers as the benchmark serves them: act-order inputs in group order and each
    block's q, k, v and gate, up joined (``ptq.fuse``; ``join=False``: as stored). Returns (sorted layers,
    joined groups)."""
    convert(model, fmt)
    if not join:
        return 0, 0
    return sort_act_order_groups(model), fuse_projections(model)


def shared_tensor_scales(model, linears: dict, fmt: str) -> dict[str, torch.Tensor]:
    """NVFP4's global scale shared by the linears that read one input (the architecture table's
    ``residual.readers``), as ptq's methods store them (``ptq.methods.rtn.round_group``) and as serving
    engines need for the one layer they make of them; empty for formats without a global scale."""
    arch = get_arch(model)
    if fmt not in ("nvfp4", "mxfp4") or arch.residual is None:
        return {}
    spec, shared = WeightSpec.build(fmt), {}
    for _, names in arch.residual.readers:
        group = [name for name in names if name in linears]
        scale = shared_tensor_scale([get_weight(linears[name]) for name in group], spec)
        if scale is not None:
            shared.update(dict.fromkeys(group, scale))
    return shared


def kernel_settings() -> dict:
    """The PTQ_* switches the kernels ran under (environment variables, read when ptq is imported)."""
    return {"PTQ_KERNELS": kernels.ENABLED, "PTQ_KERNEL_TUNE": kernels.TUNE,
            "PTQ_KERNEL_TILE_STORE": kernels.TILE_STORE, "PTQ_FP8_FAST_ACCUM": kernels.FP8_FAST_ACCUM,
            "PTQ_W8A8_COMPILED_ROUNDING": quantized_linears.COMPILED_ROUNDING}  # fmt: skip


def copy_bandwidth(device: torch.device, gib: int = 2, repeat: int = 5) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of ``repeat``."""
    buffers = [torch.empty(gib * 2**30, dtype=torch.uint8, device=device) for _ in range(2)]
    times = _timed(lambda: buffers[1].copy_(buffers[0]), repeat)
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """What one decode step must read of the weights: the block linears and the LM head (embeddings: a row each)."""
    head = model.get_output_embeddings()
    return block_linear_bytes(model) + (module_bytes(head) if head is not None else 0)


def block_linear_bytes(model) -> int:
    kinds = (torch.nn.Linear, *QUANTIZED_LAYERS)
    return sum(module_bytes(m) for block in get_blocks(model) for m in block.modules() if isinstance(m, kinds))


def _timed(fn, repeat: int, warm_up: bool = True) -> list[float]:
    if warm_up:
        fn()  # kernels compiled and autotuned, memory pools grown
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _host_seconds(fn, repeat: int) -> float:
    """Median seconds the host spends in ``fn()`` before it returns, the GPU's work left queued."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times)


@torch.no_grad()
def graphed_prefill(prefill, repeat: int) -> list[float]:
    """Seconds per ``prefill()`` replayed from one CUDA graph: the GPU's time alone. An eager prefill can be
    host-bound where Python launches a layer's kernels more slowly than the GPU runs them (a slow host, or
    small per-kernel work), which would time the host rather than the format."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch.cuda.graphs asks
        prefill()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefill()
    try:
        return _timed(graph.replay, repeat)
    finally:
        del graph  # its memory pool back before the decode measurements
        torch.cuda.empty_cache()


def _allocator_counts() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {name: stats.get(name, 0) for name in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


@torch.no_grad()
def measure(
    model,
    vocab: int,
    prefill_len: int,
    decode_batches: list,
    prompt: int,
    steps: int,
    repeat: int,
    weight_bytes: int = 0,
    max_batch: tuple[int, int] | None = None,
    compiled: bool = False,
):
    """``decode_batches`` may hold ``"max"``: resolved with ``max_batch`` = (KV bytes per token, context).
    ``compiled``: also the graphed prefill and decode of the torch.compile'd model (``prefill_compiled_*``,
    ``decode_b*_compiled_*``)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(0)
    result = {}
    ids = torch.randint(0, vocab, (1, prefill_len), generator=g).to(device)
    before = torch.cuda.memory_allocated()  # the model (and anything an earlier format left behind)
    torch.cuda.reset_peak_memory_stats()

    def prefill():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    prefill()  # warm-up (kernels compiled and tuned), not counted below
    allocator = _allocator_counts()
    times = _timed(prefill, repeat, warm_up=False)
    result["prefill_tokens_per_s"] = prefill_len / statistics.median(times)
    result["prefill_s"] = times
    # the host's time to issue one eager prefill (no wait for the GPU): near prefill_s, the prefill is host-bound
    result["prefill_host_s"] = _host_seconds(prefill, repeat)
    # cudaMalloc / cudaFree calls (and the caching allocator's retries) during the timed prefills: each cudaFree waits
    # for the GPU, so a prefill that makes them is timed with the host and the GPU in series
    result["prefill_allocator_calls"] = {k: v - allocator[k] for k, v in _allocator_counts().items()}
    result["prefill_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["prefill_activation_bytes"] = result["prefill_peak_gpu_bytes"] - before  # what the prefill itself needed
    modes = {"graphed": prefill}
    if compiled:  # inductor fuses the norms, rotary embeddings and activations (and W8A8's activation rounding)
        forward = torch.compile(model, dynamic=False)
        modes["compiled"] = lambda: forward(input_ids=ids, use_cache=False, logits_to_keep=1)
    for mode, run in modes.items():
        try:
            graphed = graphed_prefill(run, repeat)
            result[f"prefill_{mode}_tokens_per_s"] = prefill_len / statistics.median(graphed)
            result[f"prefill_{mode}_s"] = graphed
        except Exception as err:  # a model whose forward cannot be captured: eager numbers only
            result[f"prefill_{mode}_error"] = f"{type(err).__name__}: {err}"[:300]
    if max_batch is not None:  # the most sequences whose KV cache fits, given what the prefill needed
        activations = result["prefill_activation_bytes"]
        result["max_batch"] = max(
            1,
            concurrent_sequences(
                torch.cuda.get_device_properties(device).total_memory,
                weight_bytes,
                activations,
                max_batch[0],
                max_batch[1],
            ),
        )
        decode_batches = [result["max_batch"] if b == "max" else b for b in decode_batches]  # fmt: skip
    for batch in decode_batches:
        ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)

        def decode(ids=ids):
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            decode.seconds = time.perf_counter() - start

        step_times = []
        for _ in range(repeat + 1):
            decode()
            step_times.append(decode.seconds)
        step_times = step_times[1:]  # the first is the warm-up
        result[f"decode_b{batch}_eager_tokens_per_s"] = batch * steps / statistics.median(step_times)
        result[f"decode_b{batch}_eager_s"] = step_times
        try:
            graphed = [graphed_decode(model, ids, steps) for _ in range(repeat)]
            result[f"decode_b{batch}_tokens_per_s"] = batch * steps / statistics.median(graphed)
            result[f"decode_b{batch}_s"] = graphed
        except Exception as err:  # a model whose forward cannot be captured: eager numbers only
            result[f"decode_b{batch}_graph_error"] = f"{type(err).__name__}: {err}"[:300]
        if compiled:
            try:
                graphed = [graphed_decode(model, ids, steps, compiled=True) for _ in range(repeat)]
                result[f"decode_b{batch}_compiled_tokens_per_s"] = batch * steps / statistics.median(graphed)
                result[f"decode_b{batch}_compiled_s"] = graphed
            except Exception as err:
                result[f"decode_b{batch}_compiled_error"] = f"{type(err).__name__}: {err}"[:300]
    result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


@torch.no_grad()
def kernel_launches(run) -> dict[str, list]:
    """The GPU kernels of one call of ``run()`` (torch.profiler, after one untimed call): {name: [launches,
    summed seconds]}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    launches: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = launches.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time * 1e-6
    return launches


MATMUL_KERNELS = ("gemm", "gemv", "skinny", "_int_mm", "int4pack", "cutlass", "sm90", "xmma", "cublas", "matmul",
                  "splitk")  # fmt: skip
ATTENTION_KERNELS = ("attention", "flash", "fmha", "sdpa", "softmax", "_attn")


def kernel_kind(name: str) -> str:
    """A GPU kernel's kind by its name (cuBLAS, CUTLASS, cuDNN, ptq's Triton): linear, attention or other."""
    low = name.lower()
    if low.startswith("triton_"):  # inductor's fused kernels, named after the ops they fuse (ptq's included)
        return "attention" if "scaled_dot_product" in low or "decode_attention" in low else "other"
    if any(a in low for a in ATTENTION_KERNELS):
        return "attention"
    return "linear" if any(m in low for m in MATMUL_KERNELS) else "other"


def kernel_table(run) -> dict:
    """``kernel_launches`` summed: how many kernels, their summed time, the share of the matmuls, and the costliest
    names."""
    launches = kernel_launches(run)
    by_name = {name: seconds for name, (_, seconds) in launches.items()}
    top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
    return {"kernels": sum(count for count, _ in launches.values()), "kernel_seconds": sum(by_name.values()),
            "matmul_seconds": sum(t for n, t in by_name.items() if kernel_kind(n) == "linear"),
            "top": [[name[:120], t] for name, t in top]}  # fmt: skip


def profile_decode_step(model, vocab: int, prompt: int = 128, compiled: bool = False) -> dict:
    """``kernel_table`` of one decode step at batch 1: eager (DynamicCache), or with ``compiled`` the
    torch.compile'd step on a static cache that ``graphed_decode`` captures. Beside the graphed step's time this
    shows how much of a step is the linears and how much is every other kernel (norms, rotary, attention,
    copies)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    if compiled:
        return kernel_table(static_decode_step(model, ids, steps=4, compiled=True))
    from transformers import DynamicCache

    cache = DynamicCache()
    token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    # each call appends the token to the cache: the profiled step sees a context of prompt + 2
    return kernel_table(lambda: model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1))


def profile_prefill(model, vocab: int, prefill_len: int) -> dict:
    """``kernel_table`` of one prefill of ``prefill_len`` tokens, as ``measure`` times it."""
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, prefill_len), generator=torch.Generator().manual_seed(0)).to(device)
    return kernel_table(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))


@torch.no_grad()
def static_decode_step(model, prompt_ids: torch.Tensor, steps: int, compiled: bool = False):
    """A decode step on a static KV cache of ``prompt_ids`` + ``steps`` tokens, after the prompt's prefill:
    a function of no arguments that computes the next token's logits from ``step.token`` at ``step.position``
    (tensors the caller moves on in place). ``step.restart()`` empties the cache and prefills the prompt again:
    recent transformers' static caches count the tokens they hold themselves, so untimed steps (a warm-up)
    would otherwise leave the cache ahead of ``step.position``. ``compiled``: the torch.compile'd model's step."""
    from transformers import StaticCache

    device = prompt_ids.device
    prompt = prompt_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 4)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        return forward(input_ids=step.token, past_key_values=cache, cache_position=step.position, use_cache=True,
                       logits_to_keep=1)  # fmt: skip

    def restart():
        cache.reset()
        out = model(input_ids=prompt_ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        step.token.copy_(out.logits[:, -1:].argmax(-1))
        step.position.fill_(prompt)

    step.token = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.long, device=device)
    step.position = torch.tensor([prompt], device=device)
    step.restart = restart
    restart()
    return step


@torch.no_grad()
def graphed_decode(model, prompt_ids: torch.Tensor, steps: int, compiled: bool = False) -> float:
    """Seconds for ``steps`` greedy decode steps replayed from one CUDA graph (static KV cache): what
    serving engines do, so that the time is the kernels' and not Python's launching them. ``compiled``: the
    step is the torch.compile'd model's (inductor fuses the norms, rotary and activation kernels around the
    linears; ptq's kernels stay whole, as custom operators), captured the same way."""
    step = static_decode_step(model, prompt_ids, steps, compiled)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, then the prompt's cache again
        for _ in range(2):
            step()
        step.restart()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step().logits
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
        step.token.copy_(logits[:, -1:].argmax(-1))
        step.position.add_(1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode-batches", default="1,16,64,max", help="max: the most sequences of --context that fit")
    p.add_argument("--context", type=int, default=2048, help="tokens of KV cache per sequence for max and the cost")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="add the cost report at this price")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="record the kernels of one eager decode step and one prefill")
    p.add_argument("--compile", action="store_true", help="also time the graphed decode of the torch.compile'd model")
    p.add_argument("--attention", default="fused", choices=[*ATTENTION_KINDS, "sdpa"],
                   help="decode attention: ptq.attention's (GQA heads not copied) or transformers' sdpa")  # fmt: skip
    p.add_argument("--no-fuse", action="store_true",
                   help="keep the layers as stored: q, k, v and gate, up apart, act-order inputs unsorted")  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    formats = parse_formats(args.formats)
    device = cuda_or_exit("ptq.bench.infer")
    bandwidth = copy_bandwidth(device)
    batches = [b if b == "max" else int(b) for b in args.decode_batches.split(",")]
    summary = {"shape": args.shape, "layers": args.layers, "prefill": args.prefill, "prompt": args.prompt,
               "steps": args.steps, "repeat": args.repeat, "context": args.context, "attention": args.attention,
               "copy_bytes_per_s": bandwidth,
               "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
               "env": environment(device), "kernel_settings": kernel_settings(),
               "command": command_line("python -m ptq.bench.infer", argv)}  # fmt: skip
    records = []
    for fmt in formats:
        torch.manual_seed(0)
        model = build_model(args.shape, args.layers, torch.bfloat16, device)
        if args.attention != "sdpa":
            use_decode_attention(model, args.attention)
        model.config.use_cache = True
        linear_params = sum(get_weight(m).numel() for b in get_blocks(model) for m in block_linears(model, b).values())
        total_bf16 = module_bytes(model)
        linears_bf16 = block_linear_bytes(model)
        tiles_before, tuned_before = dict(kernels.tile_origins), kernels.tuned_tiles()
        sorted_layers, joined = convert_and_join(model, fmt, join=not args.no_fuse)
        torch.cuda.synchronize()
        weights, linears = module_bytes(model), block_linear_bytes(model)
        kv = kv_bytes_per_token({**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})})
        record = {
            "format": fmt,
            "joined_groups": joined,  # q, k, v / gate, up groups computed as one product each (ptq.fuse)
            "sorted_layers": sorted_layers,  # act-order layers with their inputs in group order (ptq.fuse)
            "weight_bytes": weights,  # everything the model holds: block linears + bf16 embeddings, head, norms
            "weight_bytes_vs_bf16": weights / total_bf16,
            "block_linear_bytes": linears,
            "block_linear_bytes_vs_bf16": linears / linears_bf16,
            "block_linear_bits_per_weight": 8 * linears / linear_params,
            "block_linear_params": linear_params,
            "weight_bytes_per_step": weight_bytes_per_step(model),
            **measure(model, model.config.vocab_size, args.prefill, batches, args.prompt, args.steps, args.repeat,
                      weights, (kv, args.context), args.compile),
            # this format's tuned tiles: timed here, or taken from the tile store (timed by an earlier process)
            "kernel_tiles": {origin: n - tiles_before[origin] for origin, n in kernels.tile_origins.items()},
            # the tile each of its products ran with (kernels.key_text: kind, activations, act-order, scales, one
            # token, rows, N, K, group, dtypes...); a shape an earlier format of this run tuned is not repeated
            "kernel_tiles_chosen": {kernels.key_text(key): list(map(str, tile)) for key, tile in
                                    kernels.tuned_tiles().items() if key not in tuned_before},
        }  # fmt: skip
        if args.profile:
            record["profile_b1"] = profile_decode_step(model, model.config.vocab_size, args.prompt)
            if args.compile:
                record["profile_b1_compiled"] = profile_decode_step(model, model.config.vocab_size, args.prompt, True)
            record["profile_prefill"] = profile_prefill(model, model.config.vocab_size, args.prefill)
        for key in [k for k in record if k.startswith("decode_b") and k.endswith("_tokens_per_s")]:
            steps_per_s = record[key] / int(key.split("_")[1].removeprefix("b"))
            fraction = record["weight_bytes_per_step"] * steps_per_s / bandwidth
            record[key.replace("_tokens_per_s", "_bandwidth_fraction")] = fraction
        print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}), flush=True)  # not each run
        records.append(record)
        del model
        gc.collect()  # CUDA graphs and static caches in reference cycles: freed now, not during the next format
        torch.cuda.empty_cache()
        # each format compiles its prefill and decode steps anew: without a reset their graphs accumulate
        # against torch._dynamo's recompile limit, past which later formats would run eagerly unannounced
        torch._dynamo.reset()
        if args.out:  # after every format, so that a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({**summary, "formats": records}, f, indent=2)
    summary["formats"] = records
    if args.price_per_gpu_hour is not None:
        mode = "compiled" if args.compile else "graph"
        summary["cost"] = cost_report(summary, args.price_per_gpu_hour, args.context, mode=mode)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

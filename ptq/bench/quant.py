"""``python -m ptq.bench``: quantization speed and memory at real scale, on random weights.

Builds a model of a real shape (default Llama-3-8B) with random weights directly on the GPU, draws
random calibration tokens, and runs a method end to end through ``ptq.quantize`` (the pipeline users
run). Prints one JSON record per repetition and the median, and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import zlib

import torch

import ptq
from ptq.api import join_ranks, leave_ranks
from ptq.lazy import lazy_model, load_skeleton, meta_model
from ptq.methods.stats import gather_rows
from ptq.pipeline import ACTIVATION_PLACES
from ptq.recipe import Recipe
from ptq.results import environment, peak_memory

LLAMA_70B_BLOCKS = dict(  # Llama-2-70B and Llama-3-70B share their decoder blocks
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
)
SHAPES = {
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "llama-3-70b": dict(**LLAMA_70B_BLOCKS, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-2-70b": dict(**LLAMA_70B_BLOCKS, vocab_size=32000, max_position_embeddings=4096),
    # Qwen3-30B-A3B: 48 blocks of 128 routed experts (8 active), no shared expert; about 61 GB in bf16.
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        vocab_size=151936,
        max_position_embeddings=40960,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
    ),
}


def command_line(program: str, argv: list[str] | None) -> str:
    """How this benchmark was invoked, for its record (under torchrun, as a torchrun command)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        program = program.replace("python -m", f"torchrun --nproc-per-node {local_ranks} -m", 1)
    return " ".join([program, *(argv if argv is not None else sys.argv[1:])])


def shape_config(shape: str, layers: int | None):
    from transformers import AutoConfig

    kwargs = dict(SHAPES[shape])
    if layers:
        kwargs["num_hidden_layers"] = layers
    return AutoConfig.for_model(kwargs.pop("model_type", "llama"), **kwargs, use_cache=False)


class RandomCheckpoint:
    """Stands in for the ``ShardedCheckpoint`` of a random model too large to write out (a 70B model is
    140 GB in bf16): each tensor is drawn when the pipeline reads it, on ``device`` (fast), seeded by its
    name, and handed over in host memory as a shard's tensor is (disk reads are not part of the timing).
    Values as transformers initializes a Llama: matrices normal(0, initializer_range), vectors (norms) ones."""

    def __init__(self, model, seed: int, device: torch.device) -> None:
        self.folder = f"random weights (seed {seed})"
        self.shapes = {name: param.shape for name, param in model.named_parameters()}
        self.weight_map = dict.fromkeys(self.shapes, "random")
        self.seed, self.std, self.device = seed, model.config.initializer_range, device
        self.dtype = next(model.parameters()).dtype
        self.bytes_read = 0
        # its own stream: drawing the next block (read ahead in a thread) does not queue behind the current one
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=self.dtype)
        else:
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                drawn = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype).mul_(self.std)
                # page-locked, as a loader that reads shards into pinned buffers would hand it over: the copy
                # to the GPU then runs at full speed (the time to read a real checkpoint is not counted)
                tensor = torch.empty(shape, dtype=self.dtype, pin_memory=drawn.is_cuda).copy_(drawn)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def build_model(shape: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # fused expert parameters (3-D) may be left uninitialized: give them values
        for param in model.parameters():
            if param.dim() == 3:
                param.normal_(std=config.initializer_range)
    return model.eval()


def profile_ops(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def write_profile(profiler, path: str, device: torch.device, rows: int = 40) -> None:
    """The ops that took the most time (on the GPU when there is one), as torch.profiler's table."""
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    with open(path, "w") as f:
        f.write(table)
    print(table, flush=True)


def barrier(ranks: int) -> None:
    if ranks > 1:
        import torch.distributed as dist

        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--method", default="gptq")
    p.add_argument("--format", default="int", help="weight format: int, fp8_e4m3, fp8_e5m2, nvfp4, mxfp4, mxfp8")
    p.add_argument("--bits", type=int, default=None, help="int: 2..8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="default: the format's (int 128)")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="truncate the model to this many blocks")
    p.add_argument("--offload", action="store_true", help="model starts in host memory; one block on the GPU")
    p.add_argument(
        "--activations",
        default="auto",
        choices=ACTIVATION_PLACES,
        help="where the calibration activations live (auto: host memory with --offload, else the GPU)",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--option", action="append", default=[], help="method option, e.g. gptq.act_order=true")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument(
        "--profile", default=None, help="profile the first repetition (torch.profiler); write the table of ops here"
    )
    p.add_argument("--write-checkpoint", default=None, help="only write the random model as safetensors shards here")
    p.add_argument(
        "--from-checkpoint", default=None, help="quantize a checkpoint, one block at a time from its shards (--offload)"
    )
    p.add_argument(
        "--random-lazy",
        action="store_true",
        help="(--offload) draw each block's random weights when the pipeline reads it, through the path that reads "
        "checkpoint shards: shapes too large to build whole or write out (a 70B model)",
    )
    args = p.parse_args(argv)
    if (args.random_lazy or args.from_checkpoint) and not args.offload:
        p.error("--random-lazy and --from-checkpoint read one block at a time: add --offload")
    if args.random_lazy and args.from_checkpoint:
        p.error("--random-lazy draws the weights that --from-checkpoint would read: give one of them")
    if args.write_checkpoint:
        where = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # random init is fast there
        model = build_model(args.shape, args.layers, getattr(torch, args.dtype), where)
        model.save_pretrained(args.write_checkpoint, max_shard_size="2GB")
        print(json.dumps({"written": args.write_checkpoint, "bytes": sum(
            p.numel() * p.element_size() for p in model.parameters())}))  # fmt: skip
        return

    # torchrun: every rank builds the same seeded model and calibration windows, and the pipeline splits the
    # windows over the ranks (ptq/methods/stats.py); rank 0 reports.
    rank, ranks, device = join_ranks("auto")
    # the pipeline's lines (one per block, with its ETA) on stderr, from rank 0; the records go to stdout
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    dtype = getattr(torch, args.dtype)
    options: dict = {}
    for item in args.option:
        key, value = item.split("=", 1)
        step, name = key.split(".", 1)
        options.setdefault(step, {})[name] = json.loads(value)
    recipe = Recipe.build(args.method, args.format, args.bits, args.group_size, True if args.sym else None,
                          options=options)  # fmt: skip
    runs = []
    for rep in range(args.repeat):
        torch.manual_seed(rep)
        lazy = None
        if args.from_checkpoint:  # the skeleton on the meta device; blocks read as the pipeline reaches them
            lazy = load_skeleton(args.from_checkpoint, dtype)
            model = lazy.model
        elif args.random_lazy:
            skeleton = meta_model(shape_config(args.shape, args.layers), dtype)
            lazy = lazy_model(skeleton, RandomCheckpoint(skeleton, rep, device), dtype)
            model = lazy.model
        else:
            model = build_model(args.shape, args.layers, dtype, device)
        if args.offload and lazy is None:
            model.to("cpu")
        calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        profiler = profile_ops(device) if args.profile and rep == 0 else contextlib.nullcontext()
        barrier(ranks)
        start = time.perf_counter()
        with profiler:
            report = ptq.quantize(
                model,
                recipe,
                calib=calib,
                device=device,
                offload=args.offload,
                lazy=lazy,
                batch_size=args.batch_size,
                activations=args.activations,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        barrier(ranks)  # the slowest rank's time
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rss = peak_memory(device)["peak_rss_bytes"]  # of this process so far: with --from-checkpoint, the host's peak
        per_rank = gather_rows(torch.tensor([[float(peak or 0), float(rss or 0)]], dtype=torch.float64))
        block_s = [b["seconds"] for b in report["blocks"]]
        phases: dict = {}
        for block in report["blocks"]:
            for phase, value in block["timings"].items():
                phases[phase] = phases.get(phase, 0.0) + value
            for phase, value in block["peak_gpu_bytes"].items():  # highest so far: the first block's and the last
                phases.setdefault(f"{phase}_peak_gpu_bytes_block0", value)
                phases[f"{phase}_peak_gpu_bytes"] = value
        run = {
            "rep": rep,
            "seconds": seconds,
            "peak_gpu_bytes": peak,
            "peak_rss_bytes": rss,
            # every rank's [peak GPU bytes, peak host RSS bytes], in rank order (one row without torchrun)
            "peak_bytes_per_rank": [[int(v) for v in row] for row in per_rank.tolist()],
            "checkpoint_bytes_read": lazy.checkpoint.bytes_read if lazy else None,
            "capture_s": report["capture_s"],
            "capture_peak_gpu_bytes": report.get("capture_peak_gpu_bytes"),
            "block_s_median": statistics.median(block_s) if block_s else None,
            # passes that continued from what the previous one kept (ptq/block_parts.py), over all blocks
            "continued_passes": sum(block.get("continued_passes", 0) for block in report["blocks"]),
            "block_s": block_s,  # each block's seconds: the first (kernels compiled) apart from the steady state
            **phases,
        }
        if args.profile and rep == 0 and rank == 0:
            write_profile(profiler, args.profile, device)
        if rank == 0:
            print(json.dumps({k: v for k, v in run.items() if k != "block_s"}), flush=True)
        runs.append(run)
        del model, report
    summary = {
        "shape": args.shape,
        "layers": args.layers,
        **recipe.to_dict(),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "offload": args.offload,
        "activations": args.activations,
        "from_checkpoint": bool(args.from_checkpoint),
        "random_lazy": args.random_lazy,
        "dtype": args.dtype,
        "options": recipe.options,
        "world_size": ranks,
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "peak_gpu_gib": max((r["peak_gpu_bytes"] or 0) for r in runs) / 2**30,
        "runs": runs,
        "env": environment(device),
        "command": command_line("python -m ptq.bench", argv),
    }
    leave_ranks()
    if rank > 0:
        return
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "env")}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

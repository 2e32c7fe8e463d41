"""One run, as stages: check, data, load, baseline, quantize, evaluate, save.

``run(cfg)`` calls them in order and hands the results to ``ptq.record``. Everything cheap comes first
(``check``), so that bad settings and missing files fail before heavy work.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ptq import checkpoint, data, models, record
from ptq.api import join_ranks, prepare_steps, run_steps
from ptq.cache import Cache, digest, files_digest, tokenizer_digest
from ptq.config import ConfigError, RunConfig, check_context
from ptq.data import EVAL_SETS
from ptq.eval.perplexity import per_example, perplexity_of, token_nll
from ptq.eval.tasks import evaluate_tasks, resolve_tasks, task_data_dir
from ptq.lazy import has_safetensors, load_skeleton
from ptq.pipeline import activation_store, available_host_bytes, free_memory
from ptq.results import environment, write_json
from ptq.storage import compressed_tensors
from ptq.storage.progress import Progress
from ptq.storage.vllm import vllm_scheme

log = logging.getLogger("ptq")


@dataclass
class Plan:
    """What ``check`` found: the model's source and config, the prepared steps, the task list."""

    source: models.ModelSource
    config: object
    steps: list
    loaded_checkpoint: str | None  # "gptq" or "compressed-tensors" when model.path is a quantized checkpoint
    uses_calibration: bool
    context: int | None
    tasks: list[tuple[str, str]]  # (name as recorded, "hub" | "local")
    tokenizer: object

    @property
    def moe(self) -> bool:
        """A mixture-of-experts model (the architecture table has an experts entry)."""
        return models.arch_for(self.config.model_type).experts is not None


@dataclass
class Data:
    windows: dict[str, torch.Tensor]  # evaluation windows per data set
    eval_info: dict
    eval_seqlen: int
    calibration: data.Calibration | None
    cache: Cache


@dataclass
class Loaded:
    model: torch.nn.Module
    lazy: object = None  # ptq.lazy.LazyModel when blocks are read from the shards one at a time
    store: object = None  # collects each quantized linear's stored tensors when saving (save_format's store)
    fp_deps: dict = field(default_factory=dict)  # what the full-precision scores depend on (cache key)


def check(cfg: RunConfig, named: list[str] | tuple = ()) -> Plan:
    """Read the model's config and tokenizer and check every setting against them; warn about the
    settings the command line ``named`` that this run does not use."""
    m = cfg.model
    source = models.resolve_source(m.path, m.gguf_file, m.hub_id, m.assets_dir, m.assets_gguf_file, cfg.assets_root())
    config = models.load_config(source)
    loaded_checkpoint = checkpoint.checkpoint_kind(config)
    if loaded_checkpoint and not cfg.full_precision:
        raise ConfigError(
            f"model.path={source.path} is already a quantized ({loaded_checkpoint}) checkpoint: evaluate it with "
            "method=none, or quantize the full-precision model it came from"
        )
    steps = prepare_steps(cfg.recipe, config)  # e.g. AWQ: does the architecture table know this model?
    if cfg.save and cfg.save_format == "gptq" and models.arch_for(config.model_type).experts is not None:
        raise ConfigError(
            f"save_format=gptq: ptq writes {config.model_type} (mixture-of-experts) checkpoints in compressed-tensors "
            "only; drop save_format (compressed-tensors is the default)"
        )
    uses_calibration = any(step.needs_calibration for step in steps)
    unused = [k for k in named if not uses_calibration and (k == "calib" or k.startswith("calib."))]
    if unused:
        log.warning("method=%s reads no calibration data: %s ignored", cfg.recipe.method, ", ".join(unused))
    context = models.max_context_of(config)
    check_context(cfg, context, uses_calibration)
    tasks = []
    if cfg.eval.tasks:
        tasks = resolve_tasks(
            cfg.eval.tasks, cfg.eval.task_source, task_data_dir(cfg.assets_root(), cfg.eval.task_data),
            cfg.eval.task_include, cfg.eval.task_files,
        )  # fmt: skip
    tokenizer = models.load_tokenizer(source)
    return Plan(source, config, steps, loaded_checkpoint, uses_calibration, context, tasks, tokenizer)


def check_calibration_memory(cfg: RunConfig, plan: Plan, device: torch.device) -> None:
    """Refuse, before sampling anything, calibration whose activations cannot fit: the pipeline keeps a
    block's inputs for every window, each output written over its input (host memory when offloading or on
    the CPU), plus a chunk of outputs in flight."""
    if not plan.uses_calibration:
        return
    config = plan.config.get_text_config() if hasattr(plan.config, "get_text_config") else plan.config
    element = torch.finfo(pick_dtype(cfg.model.dtype, device, plan.config)).bits // 8
    need = (cfg.calib.nsamples + cfg.calib.batch_size) * cfg.calib.seqlen * config.hidden_size * element
    on_host = activation_store(cfg.calib.activations, cfg.offload, device).type == "cpu"
    available = available_host_bytes() if on_host else free_memory(device)
    if available is not None and need > available:
        raise ConfigError(
            f"calib.nsamples={cfg.calib.nsamples} windows of calib.seqlen={cfg.calib.seqlen} tokens need about "
            f"{need / 2**30:.1f} GiB of {'host' if on_host else 'GPU'} memory for a block's inputs, more "
            f"than the {available / 2**30:.1f} GiB available: lower calib.nsamples"
            + ("" if on_host else " or set calib.activations=host (or offload=true)")
        )


def load_data(cfg: RunConfig, plan: Plan, writes_cache: bool = True) -> Data:
    """Tokenized evaluation windows and calibration windows (both cached on disk; ``writes_cache=False``: computed
    here, neither read nor written, as on torchrun's ranks other than 0)."""
    cache = Cache(cfg.cache.dir, cfg.cache.enabled and writes_cache)
    tokenizer_id = tokenizer_digest(plan.tokenizer)
    eval_seqlen = cfg.eval.seqlen or min(plan.context or 2048, 2048)
    windows, eval_info = {}, {}
    for source in cfg.eval.ppl:
        text = data.load_eval_text(source, cfg.assets_root())
        name = data.eval_name(source, text)
        text_digest = digest(text.joined)
        tokens = cache.tensors(
            "eval_tokens",
            {"text": text_digest, "tokenizer": tokenizer_id},
            lambda text=text: {"ids": data.tokenize(plan.tokenizer, text.joined)},
        )
        ids = tokens["ids"]
        protocol_cap = EVAL_SETS[source].max_windows if source in EVAL_SETS else None
        caps = [n for n in (cfg.eval.max_windows, protocol_cap) if n is not None]
        windows[name] = data.eval_windows(ids, eval_seqlen, min(caps) if caps else None)
        eval_info[name] = {"source": text.source, "digest": text_digest, "tokens": ids.shape[1],
                           "windows": windows[name].shape[0]}  # fmt: skip
    calibration = None
    if plan.uses_calibration:
        c = cfg.calib
        text = data.calibration_text(c.name, c.path, cfg.assets_root())
        documents = data.samples_documents(c.name, c.path)

        def sample() -> dict:
            ids, offsets = data.sample_calibration(plan.tokenizer, text, documents, c.nsamples, c.seqlen, c.seed)
            return {"input_ids": ids, "offsets": offsets}

        deps = {"text": digest(text.joined), "tokenizer": tokenizer_id, "documents": documents}
        deps |= {"nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}
        sampled = cache.tensors("calibration", deps, sample)
        calibration = data.Calibration(sampled["input_ids"], text.source, sampled["offsets"])
    return Data(windows, eval_info, eval_seqlen, calibration, cache)


def pick_dtype(name: str, device: torch.device, config) -> torch.dtype:
    """auto: fp32 on CPU; on CUDA the checkpoint's half type (bf16 if it says so, else fp16, the
    GPTQ reference's choice). Statistics are accumulated in fp32 whatever the model's dtype."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if str(stored).endswith("bfloat16") else torch.float16


def load(cfg: RunConfig, plan: Plan, batch: Data, device: torch.device, saves: bool = True) -> Loaded:
    """The model: a quantized checkpoint, a lazily loaded skeleton (offload from local shards) or
    the whole model; when saving, checks first that every linear can be packed."""
    source = plan.source
    lazy = None
    dtype = pick_dtype(cfg.model.dtype, device, plan.config)
    if plan.loaded_checkpoint == "gptq":
        model = checkpoint.load_quantized(source.path, dtype)
    elif plan.loaded_checkpoint == "compressed-tensors" and not plan.moe:
        model = compressed_tensors.load(source.path, dtype)
    elif (
        cfg.offload
        and not plan.moe
        and source.origin != "hub"
        and not source.gguf_file
        and has_safetensors(source.path)
    ):
        # (MoE checkpoints are not read lazily yet: they store experts one by one, the model fuses them)
        # One block in host memory at a time: the rest of the model stays on the meta device until
        # the pipeline reaches it (ptq/lazy.py).
        lazy = load_skeleton(source.path, dtype)
        model = lazy.model
    elif plan.loaded_checkpoint == "compressed-tensors":  # a MoE folder: transformers decompresses its experts
        try:
            model = models.load_model(source, dtype)
        except RuntimeError as err:
            raise models.ModelLoadError(
                f"transformers could not read the experts of {source.path} ({str(err).splitlines()[0][:160]}); ptq "
                "evaluates mixture-of-experts folders through transformers, which reads weight-only experts "
                "(e.g. W4A16) but not activation-quantized ones: serve this folder with vLLM instead"
            ) from None
    else:
        model = models.load_model(source, dtype)
    store = None
    if cfg.save and saves:  # before any heavy work: can every linear be packed?
        names = {id(mod): name for name, mod in model.named_modules()}
        linears = {names[id(mod)]: mod for block in models.get_blocks(model)
                   for mod in models.block_linears(model, block).values()}  # fmt: skip
        out = Path(cfg.output_dir) / "model"
        if cfg.save_format == "gptq":
            checkpoint.check_savable(cfg.recipe.weights.bits, linears)
            store = checkpoint.PackedStore(cfg.recipe, out, cfg.max_shard_size)
        else:
            compressed_tensors.check_linears(linears, cfg.recipe.weights)
            store = compressed_tensors.CompressedStore(model, cfg.recipe, out, cfg.max_shard_size)
    # The full-precision scores depend on the model, its dtype and device and what is evaluated, not on
    # the method: one cache entry serves every job of a sweep (method=none included).
    fp_deps = {
        "model": files_digest(source.path),
        "gguf_file": source.gguf_file,
        "dtype": str(next(model.parameters()).dtype),
        "device": device.type,
        "windows": {name: digest(w) for name, w in batch.windows.items()},
        "tasks": plan.tasks,
        "task_include": files_digest(cfg.eval.task_include) if cfg.eval.task_include else None,
        "eval": {k: v for k, v in asdict(cfg.eval).items() if k not in ("ppl", "max_windows", "seqlen", "baseline")},
        "offload": cfg.offload,
        "seed": cfg.seed,
        "versions": {k: v for k, v in environment(device).items() if k in ("torch", "transformers", "lm_eval", "ptq")},
    }
    return Loaded(model, lazy, store, fp_deps)


def evaluate(
    model, tokenizer, windows: dict, tasks: list[tuple[str, str]], cfg: RunConfig, device: torch.device, lazy=None
) -> tuple[dict, float]:
    """GPTQ-protocol perplexity on every window set, then the lm-eval tasks; (metrics, seconds)."""
    start = time.perf_counter()
    e = cfg.eval
    ppl = {}
    ppl_batch = 1 if e.batch_size == "auto" else e.batch_size
    examples = {}
    for name, w in windows.items():
        nll = token_nll(model, w, device, offload=cfg.offload, batch_size=ppl_batch, lazy=lazy)
        ppl[name] = perplexity_of(nll)
        if e.per_example:
            examples[name] = per_example(nll, w, tokenizer)
        log.info("%s perplexity: %.4f (%d windows of %d)", name, ppl[name], w.shape[0], w.shape[1])
    metrics = {"ppl": ppl}
    if e.per_example:
        metrics["per_example"] = examples
    if tasks:
        metrics["tasks"] = evaluate_tasks(
            model, tokenizer, tasks, task_data_dir(cfg.assets_root(), e.task_data), e.batch_size, e.limit,
            e.num_fewshot, device, cfg.seed, e.max_length, e.task_include, e.task_files,
        )  # fmt: skip
    return metrics, time.perf_counter() - start


def full_precision_scores(cfg: RunConfig, plan: Plan, batch: Data, loaded: Loaded, device: torch.device) -> dict:
    """The full-precision model's scores, from the cache when the same model was scored the same way."""

    def score() -> dict:
        metrics, seconds = evaluate(loaded.model, plan.tokenizer, batch.windows, plan.tasks, cfg, device, loaded.lazy)
        return {"metrics": metrics, "eval_s": seconds}

    return batch.cache.json("fp_metrics", loaded.fp_deps, score)


def quantize(
    cfg: RunConfig, plan: Plan, batch: Data, loaded: Loaded, device: torch.device, progress: Progress | None = None
) -> dict:
    report = run_steps(
        loaded.model,
        plan.steps,
        calib=batch.calibration.input_ids if batch.calibration else None,
        device=device,
        offload=cfg.offload,
        batch_size=cfg.calib.batch_size,
        activations=cfg.calib.activations,
        on_quantized=loaded.store.add if loaded.store else None,
        lazy=loaded.lazy,
        on_block_done=loaded.store.block_done if loaded.store else None,
        progress=progress,
        experts=cfg.moe,
    )
    if progress is not None:
        report["resumed_from_block"] = progress.done or None
    if plan.loaded_checkpoint == "gptq":
        report["storage"] = checkpoint.loaded_storage(loaded.model)
    elif plan.loaded_checkpoint == "compressed-tensors":
        report["storage"] = compressed_tensors.stored_storage(plan.source.path, loaded.model)
    return report


def save(cfg: RunConfig, loaded: Loaded, tokenizer) -> dict:
    """Finish the checkpoint whose blocks were written as they were quantized."""
    files = loaded.store.save(loaded.model, tokenizer)
    folder = loaded.store.folder.out
    saved = {"dir": str(folder), "format": cfg.save_format, "files": files, "bytes": sum(files.values())}
    if cfg.save_format == "compressed-tensors":  # a prediction from vLLM 0.33's rules (ptq/storage/vllm.py)
        saved["vllm_scheme"] = vllm_scheme(loaded.store.config)
    log.info("saved the quantized model to %s (%.1f MiB)", folder, saved["bytes"] / 2**20)
    return saved


@dataclass
class Outcome:
    metrics: dict
    baseline: dict | None  # the full-precision scores beside a quantized run
    report: dict  # the pipeline's
    saved: dict | None


def quantize_evaluate_save(
    cfg: RunConfig,
    plan: Plan,
    batch: Data,
    loaded: Loaded,
    device: torch.device,
    timings: dict,
    progress: Progress | None = None,
) -> Outcome:
    """The heavy part of a run: baseline scores, quantization (writing the checkpoint's blocks as they
    finish when saving), evaluation, and the rest of the checkpoint."""
    baseline = None
    if not cfg.full_precision and cfg.eval.baseline and not plan.loaded_checkpoint:
        t = time.perf_counter()
        baseline = full_precision_scores(cfg, plan, batch, loaded, device)
        timings["baseline_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    report = quantize(cfg, plan, batch, loaded, device, progress)
    timings["quantize_s"] = time.perf_counter() - t

    if cfg.full_precision and not plan.loaded_checkpoint:
        t = time.perf_counter()
        metrics = full_precision_scores(cfg, plan, batch, loaded, device)["metrics"]
        timings["eval_s"] = time.perf_counter() - t
    else:
        metrics, timings["eval_s"] = evaluate(loaded.model, plan.tokenizer, batch.windows, plan.tasks, cfg, device)
    saved = None
    if loaded.store is not None:
        t = time.perf_counter()
        saved = save(cfg, loaded, plan.tokenizer)
        timings["save_s"] = time.perf_counter() - t
    return Outcome(metrics, baseline, report, saved)


def run(cfg: RunConfig, named: list[str] | tuple = ()) -> dict | None:
    """One run; returns the record (also written to <output_dir>/result.json). ``named``: the settings
    the command line gave (warned about when this run does not use them). Under torchrun only rank 0 returns
    the record (the other ranks return None)."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    rank, ranks, device = join_ranks(cfg.device)
    for stale in ("result.json", "error.json") if rank == 0 else ():  # a record here must describe this run
        (out / stale).unlink(missing_ok=True)
    if rank > 0:  # the same log lines as rank 0's: only warnings from the other ranks
        logging.getLogger("ptq").setLevel(logging.WARNING)
    if ranks > 1 and cfg.resume:
        raise ConfigError("resume=true continues a run in one process: resume without torchrun (or set resume=false)")
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}

    plan = check(cfg, named)
    check_calibration_memory(cfg, plan, device)
    # Data-parallel ranks (torchrun): all calibrate, rank 0 alone evaluates and writes (records, caches,
    # checkpoints, progress); the others hold the same quantized model and leave when quantization is done.
    progress = start_progress(cfg, plan) if rank == 0 else None
    t = time.perf_counter()
    batch = load_data(cfg, plan, writes_cache=rank == 0)
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded = load(cfg, plan, batch, device, saves=rank == 0)
    timings["load_s"] = time.perf_counter() - t
    log.info("loaded %s from %s (%s) in %.1f s", cfg.model.name or plan.source.path, plan.source.path,
             plan.source.origin, timings["load_s"])  # fmt: skip
    if rank > 0:
        quantize(cfg, plan, batch, loaded, device)
        return None
    try:
        outcome = quantize_evaluate_save(cfg, plan, batch, loaded, device, timings, progress)
    except BaseException:
        if loaded.store is not None:
            loaded.store.discard()  # the blocks written so far: no half-written checkpoint is left
        raise
    timings["total_s"] = time.perf_counter() - started

    result = record.assemble(cfg, plan, batch, loaded, device, outcome.metrics, outcome.baseline, outcome.report,
                             timings, outcome.saved)  # fmt: skip
    write_json(out / "result.json", result)
    if progress is not None:
        progress.discard()  # the run is finished: its record and checkpoint are what stays
    return result


# What decides a run's quantized weights: a run resumes only when these are the interrupted run's.
RESUME_SETTINGS_IGNORED = ("eval", "cache", "output_dir", "overwrite", "resume", "progress", "save", "save_format",
                           "max_shard_size", "experiment", "assets")  # fmt: skip


def start_progress(cfg: RunConfig, plan: Plan) -> Progress | None:
    """The run folder's record of finished blocks (None when nothing is quantized or progress=false);
    with resume=true, the blocks an interrupted run left there with the same settings are kept."""
    out = Path(cfg.output_dir)
    for stale in out.glob(".model.*.partial"):  # a killed run's unfinished checkpoint: its blocks are rewritten
        shutil.rmtree(stale, ignore_errors=True)
    if not cfg.progress or not plan.steps or plan.loaded_checkpoint:
        shutil.rmtree(out / "progress", ignore_errors=True)
        return None
    settings = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_SETTINGS_IGNORED}
    progress = Progress(out, json.loads(json.dumps(settings, default=str)))
    restored = progress.start(cfg.resume)
    if cfg.resume:
        log.info("resume=true: %d finished block(s) in %s", restored, progress.folder)
    return progress

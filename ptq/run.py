"""``python -m ptq.run method=rtn bits=4 group_size=128``: load, calibrate, quantize, evaluate, record.

Glue only: the algorithm lives in ptq/methods, the executor in ptq/pipeline.py.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ptq import checkpoint, data, models
from ptq.api import plan_steps, quantize, resolve_device
from ptq.cache import Cache, digest, files_digest, tokenizer_digest
from ptq.config import ConfigError, RunConfig, check_context, from_dict
from ptq.data import EVAL_SETS, DataError
from ptq.eval.perplexity import perplexity
from ptq.eval.tasks import TaskError, evaluate_tasks, resolve_tasks, task_data_dir
from ptq.lazy import has_safetensors, load_skeleton
from ptq.models import ModelLoadError
from ptq.report import metric_columns, metric_value
from ptq.results import environment, peak_memory, write_json

log = logging.getLogger("ptq")
EXPECTED_ERRORS = (ConfigError, ModelLoadError, DataError, TaskError)


def pick_dtype(name: str, device: torch.device, config) -> torch.dtype:
    """auto: fp32 on CPU; on CUDA the checkpoint's half type (bf16 if it says so, else fp16, the
    GPTQ reference's choice). Statistics are accumulated in fp32 whatever the model's dtype."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if str(stored).endswith("bfloat16") else torch.float16


def evaluate(
    model, tokenizer, windows: dict, tasks: list[tuple[str, str]], cfg: RunConfig, device: torch.device, lazy=None
) -> tuple[dict, float]:
    start = time.perf_counter()
    e = cfg.eval
    ppl = {}
    ppl_batch = 1 if e.batch_size == "auto" else e.batch_size
    for name, w in windows.items():
        ppl[name] = perplexity(model, w, device, offload=cfg.offload, batch_size=ppl_batch, lazy=lazy)
        log.info("%s perplexity: %.4f (%d windows of %d)", name, ppl[name], w.shape[0], w.shape[1])
    metrics = {"ppl": ppl}
    if tasks:
        metrics["tasks"] = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            task_data_dir(cfg.assets_root(), e.task_data),
            e.batch_size,
            e.limit,
            e.num_fewshot,
            device,
            cfg.seed,
            e.max_length,
        )
    return metrics, time.perf_counter() - start


def run(cfg: RunConfig) -> dict:
    """One run; returns the record (also written to <output_dir>/result.json)."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    for stale in ("result.json", "error.json"):  # a record in this folder must describe this run
        (out / stale).unlink(missing_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}

    # Everything cheap first, so bad settings and missing files fail before heavy work.
    try:
        steps = plan_steps(
            cfg.method, cfg.bits, cfg.group_size, cfg.sym, cfg.method_options, cfg.act_bits, cfg.act_granularity
        )
    except ValueError as err:  # a method's own option checks, activation settings
        raise ConfigError(str(err)) from None
    m = cfg.model
    source = models.resolve_source(m.path, m.gguf_file, m.hub_id, m.assets_dir, m.assets_gguf_file, cfg.assets_root())
    config = models.load_config(source)
    loaded_checkpoint = checkpoint.is_gptq_checkpoint(config)
    if loaded_checkpoint and not cfg.full_precision:
        raise ConfigError(
            f"model.path={source.path} is already a quantized (GPTQ) checkpoint: evaluate it with method=none, "
            "or quantize the full-precision model it came from"
        )
    for step in steps:
        step.prepare(config)  # e.g. AWQ: does the architecture table know this model's scaling groups?
    uses_calibration = any(step.needs_calibration for step in steps)
    context = models.max_context_of(config)
    check_context(cfg, context, uses_calibration)
    tasks = []  # (name as recorded, "hub" | "local"): task names and local files checked before heavy work
    if cfg.eval.tasks:
        tasks = resolve_tasks(
            cfg.eval.tasks, cfg.eval.task_source, task_data_dir(cfg.assets_root(), cfg.eval.task_data)
        )
    tokenizer = models.load_tokenizer(source)

    t = time.perf_counter()
    cache = Cache(cfg.cache.dir, cfg.cache.enabled)
    tokenizer_id = tokenizer_digest(tokenizer)
    eval_seqlen = cfg.eval.seqlen or min(context or 2048, 2048)
    windows, eval_info = {}, {}
    for name in cfg.eval.ppl:
        text = data.load_text(name, EVAL_SETS, cfg.assets_root())
        tokens = cache.tensors(
            "eval_tokens",
            {"text": digest(text.joined), "tokenizer": tokenizer_id},
            lambda text=text: {"ids": data.tokenize(tokenizer, text.joined)},
        )
        ids = tokens["ids"]
        caps = [n for n in (cfg.eval.max_windows, EVAL_SETS[name].max_windows) if n is not None]
        windows[name] = data.eval_windows(ids, eval_seqlen, min(caps) if caps else None)
        eval_info[name] = {"source": text.source, "tokens": ids.shape[1], "windows": windows[name].shape[0]}
    calibration = None
    if uses_calibration:
        c = cfg.calib
        text = data.calibration_text(c.name, c.path, cfg.assets_root())
        documents = data.samples_documents(c.name, c.path)

        def sample() -> dict:
            ids, offsets = data.sample_calibration(tokenizer, text, documents, c.nsamples, c.seqlen, c.seed)
            return {"input_ids": ids, "offsets": offsets}

        deps = {"text": digest(text.joined), "tokenizer": tokenizer_id, "documents": documents}
        deps |= {"nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}
        sampled = cache.tensors("calibration", deps, sample)
        calibration = data.Calibration(sampled["input_ids"], text.source, sampled["offsets"])
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lazy = None
    dtype = pick_dtype(m.dtype, device, config)
    if loaded_checkpoint:
        model = checkpoint.load_quantized(source.path, dtype)
    elif cfg.offload and source.origin != "hub" and not source.gguf_file and has_safetensors(source.path):
        # One block in host memory at a time: the rest of the model stays on the meta device until
        # the pipeline reaches it (ptq/lazy.py).
        lazy = load_skeleton(source.path, dtype)
        model = lazy.model
    else:
        model = models.load_model(source, dtype)
    timings["load_s"] = time.perf_counter() - t
    store = None
    if cfg.save:  # before any heavy work: can every linear be packed?
        names = {id(mod): name for name, mod in model.named_modules()}
        linears = {names[id(mod)]: mod for block in models.get_blocks(model)
                   for mod in models.block_linears(model, block).values()}  # fmt: skip
        try:
            checkpoint.check_savable(cfg.bits, linears)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        store = checkpoint.PackedStore()
    log.info(
        "loaded %s from %s (%s) in %.1f s",
        m.name or source.path,
        source.path,
        source.origin,
        timings["load_s"],
    )

    # The full-precision scores depend on the model, its dtype and device and what is evaluated, not on
    # the method: one cache entry serves every job of a sweep (method=none included).
    fp_deps = {
        "model": files_digest(source.path),
        "gguf_file": source.gguf_file,
        "dtype": str(next(model.parameters()).dtype),
        "device": device.type,
        "windows": {name: digest(w) for name, w in windows.items()},
        "tasks": tasks,
        "eval": {k: v for k, v in asdict(cfg.eval).items() if k not in ("ppl", "max_windows", "seqlen", "baseline")},
        "offload": cfg.offload,
        "seed": cfg.seed,
        "versions": {k: v for k, v in environment(device).items() if k in ("torch", "transformers", "lm_eval", "ptq")},
    }

    def evaluate_full_precision() -> dict:
        metrics, seconds = evaluate(model, tokenizer, windows, tasks, cfg, device, lazy)
        return {"metrics": metrics, "eval_s": seconds}

    baseline = None
    if not cfg.full_precision and cfg.eval.baseline and not loaded_checkpoint:
        t = time.perf_counter()
        fp = cache.json("fp_metrics", fp_deps, evaluate_full_precision)
        timings["baseline_eval_s"] = time.perf_counter() - t
        baseline = {"metrics": fp["metrics"], "eval_s": fp["eval_s"]}

    t = time.perf_counter()
    report = quantize(
        model,
        method=cfg.method,
        bits=cfg.bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
        calib=calibration.input_ids if calibration else None,
        device=device,
        offload=cfg.offload,
        batch_size=cfg.calib.batch_size,
        options=cfg.method_options,
        act_bits=cfg.act_bits,
        act_granularity=cfg.act_granularity,
        on_quantized=store.add if store else None,
        lazy=lazy,
    )
    timings["quantize_s"] = time.perf_counter() - t
    if loaded_checkpoint:
        report["storage"] = checkpoint.loaded_storage(model)

    if cfg.full_precision and not loaded_checkpoint:
        t = time.perf_counter()
        metrics = cache.json("fp_metrics", fp_deps, evaluate_full_precision)["metrics"]
        timings["eval_s"] = time.perf_counter() - t
    else:
        metrics, timings["eval_s"] = evaluate(model, tokenizer, windows, tasks, cfg, device)
    saved = None
    if store is not None:
        t = time.perf_counter()
        files = checkpoint.save_quantized(model, store, tokenizer, out / "model")
        timings["save_s"] = time.perf_counter() - t
        saved = {"dir": str(out / "model"), "files": files, "bytes": sum(files.values())}
        log.info("saved the quantized model to %s (%.1f MiB)", out / "model", saved["bytes"] / 2**20)
    timings["total_s"] = time.perf_counter() - started

    qc = model.config.quantization_config if loaded_checkpoint else None
    record = {
        "status": "ok",
        "model": m.name or m.path,
        "method": "loaded" if qc else "none" if cfg.full_precision else cfg.method,
        "bits": qc["bits"] if qc else 16 if cfg.full_precision else cfg.bits,
        "group_size": qc["group_size"] if qc else None if cfg.full_precision else cfg.group_size,
        "sym": qc.get("sym") if qc else None if cfg.full_precision else cfg.sym,
        "loaded_quantization": qc,
        "saved": saved,
        "model_bytes_in_memory": checkpoint.module_bytes(model),
        "lazy_load": None
        if lazy is None
        else {
            "bytes_read": lazy.checkpoint.bytes_read,
            "peak_blocks_in_memory": lazy.peak_materialized_blocks,
        },
        "act_bits": cfg.act_bits,
        "act_granularity": cfg.act_granularity if cfg.act_bits else None,
        "metrics": metrics,
        "baseline": baseline,
        "timings": timings,
        "memory": peak_memory(device),
        "model_source": {"path": source.path, "gguf_file": source.gguf_file, "origin": source.origin},
        "calibration": {
            "used": calibration is not None,  # RTN and full precision read no calibration data
            "name": cfg.calib.name,
            "source": calibration.source if calibration else None,
            "nsamples": cfg.calib.nsamples,
            "seqlen": cfg.calib.seqlen,
            "seed": cfg.calib.seed,
            "offsets": calibration.offsets if calibration else [],
        },
        "eval": {"seqlen": eval_seqlen, "max_windows": cfg.eval.max_windows, "ppl": eval_info},
        "quantization": report,
        "cache": {"dir": str(cache.root) if cache.enabled else None, "hits": cache.hits},
        "env": environment(device),
        "config": cfg.to_dict(),
    }
    write_json(out / "result.json", record)
    return record


def format_table(record: dict) -> str:
    cols = metric_columns([record["metrics"]])
    widths = [max(10, len(h)) for h, _ in cols]
    rows = [f"{'':28} " + " ".join(f"{h:>{w}}" for (h, _), w in zip(cols, widths, strict=True))]

    def number(v) -> str:  # perplexities with 3 decimals, accuracies with 4, huge values in exponent form
        if v is None:
            return "—"
        return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.3f}" if abs(v) >= 1 else f"{v:.4f}"

    def row(label: str, metrics: dict) -> str:
        values = [number(metric_value(metrics, path)) for _, path in cols]
        return f"{label:28} " + " ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))

    base = (record.get("baseline") or {}).get("metrics")
    if base:
        rows.append(row("full precision", base))
    if record["method"] == "none":
        label = "full precision"
    else:
        group = "per-channel" if record["group_size"] == -1 else f"g{record['group_size']}"
        label = f"{record['method']} w{record['bits']}"
        if record.get("act_bits"):
            label += f"a{record['act_bits']} ({record['act_granularity']})"
        label += f" {group} {'sym' if record['sym'] else 'asym'}"
    rows.append(row(label, record["metrics"]))
    t = record["timings"]
    mem = record["memory"]
    gpu = f", peak GPU {mem['peak_gpu_bytes'] / 2**30:.2f} GiB" if mem["peak_gpu_bytes"] else ""
    rows.append(
        f"ppl: GPTQ-protocol token perplexity ({record['eval']['seqlen']}-token windows); "
        f"quantize {t['quantize_s']:.1f} s, eval {t['eval_s']:.1f} s, total {t['total_s']:.1f} s; "
        f"peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB{gpu}"
    )
    notes = {task: s["note"] for task, s in (record["metrics"].get("tasks") or {}).items() if s.get("note")}
    rows += [f"{task}: {note}" for task, note in notes.items()]
    return "\n".join(rows)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(hydra_cfg: DictConfig) -> None:
    container = OmegaConf.to_container(hydra_cfg, resolve=True)
    output_dir = Path(container.get("output_dir") or ".")
    try:
        cfg = from_dict(container)
        record = run(cfg)
    except Exception as err:
        expected = isinstance(err, EXPECTED_ERRORS)
        (output_dir / "result.json").unlink(missing_ok=True)  # no earlier success may stand beside this failure
        write_json(
            output_dir / "error.json",
            {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": None if expected else traceback.format_exc(),
                "config": container,
            },
        )
        if not expected:
            raise
        print(f"error: {err}", file=sys.stderr)
        if _in_multirun():
            return  # keep the sweep going; the failure is recorded in error.json
        sys.exit(2)
    print(format_table(record))
    print(output_dir / "result.json")


if __name__ == "__main__":
    main()

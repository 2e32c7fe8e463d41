"""The JSON record of a run (``result.json``): settings, metrics, timings, memory, storage, environment
and the calibration sample offsets. Reports and plots are made from these, never typed by hand."""

from __future__ import annotations

import torch

from ptq import checkpoint
from ptq.results import environment, peak_memory


def assemble(cfg, plan, batch, loaded, device: torch.device, metrics, baseline, report, timings, saved) -> dict:
    """The record of a finished run (the stages' results from ``ptq.job``)."""
    model, lazy, calibration = loaded.model, loaded.lazy, batch.calibration
    qc = checkpoint.quantization_config_of(plan.config) if plan.loaded_checkpoint else None
    recipe = cfg.recipe.to_dict()
    if qc:  # a loaded checkpoint: what it holds, not what this run asked for (method=none)
        recipe |= checkpoint.loaded_recipe_fields(qc)
    m = cfg.model
    return {
        "status": "ok",
        "model": m.name or m.path,
        **recipe,
        "loaded_quantization": qc,
        "loaded_layers": checkpoint.layer_kinds(model) if qc else None,
        "saved": saved,
        "model_bytes_in_memory": checkpoint.module_bytes(model),
        "lazy_load": None
        if lazy is None
        else {"bytes_read": lazy.checkpoint.bytes_read, "peak_blocks_in_memory": lazy.peak_materialized_blocks},
        "metrics": metrics,
        "baseline": baseline,
        "timings": timings,
        "memory": peak_memory(device),
        "model_source": {"path": plan.source.path, "gguf_file": plan.source.gguf_file, "origin": plan.source.origin},
        "calibration": {
            "used": calibration is not None,  # RTN and full precision read no calibration data
            "name": cfg.calib.name,
            "source": calibration.source if calibration else None,
            "nsamples": cfg.calib.nsamples,
            "seqlen": cfg.calib.seqlen,
            "seed": cfg.calib.seed,
            "offsets": calibration.offsets if calibration else [],
        },
        "eval": {"seqlen": batch.eval_seqlen, "max_windows": cfg.eval.max_windows, "ppl": batch.eval_info},
        "quantization": report,
        "cache": {"dir": str(batch.cache.root) if batch.cache.enabled else None, "hits": batch.cache.hits},
        "env": environment(device),
        "config": cfg.to_dict(),
    }

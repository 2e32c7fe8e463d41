"""``python -m ptq.study precision checkpoints=<folder>``: every checkpoint x method x precision, one record each.

A point is the increase in validation loss (nats per token) that quantizing a checkpoint's weights causes:
δ = L(quantized) − L(full precision), both on the same held-out windows. Checkpoints come from
``ptq.study train`` (folders holding ``study.json`` with N and D) or from a list naming Hub models and
revisions with their N and D (e.g. Pythia's ``step1000`` ... ``step143000``). Each point is written to
``<out>/records/<checkpoint>/<method>_<format><bits>.json`` as soon as it is measured; a point whose record
exists with the same settings is not measured again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ptq.errors import UserError

log = logging.getLogger("ptq.study")

METHODS = ("rtn", "gptq", "awq")
FLOAT_FORMATS = ("fp8_e4m3", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class PrecisionConfig:
    checkpoints: object  # a folder of trained checkpoints, or a list of {path|model, revision, n_params, tokens}
    out: str
    study: str = "study"
    data: str | None = None  # a prepared corpus (ptq.study prepare): calibration from train, evaluation from val
    text: str | None = None  # or a text file, tokenized with each checkpoint's tokenizer (first 90% calibration)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    bits: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8])
    method_bits: dict | None = None  # per method, a subset of bits (e.g. {gptq: [3, 4]}); default: all bits
    formats: list[str] = field(default_factory=list)  # also these float formats (RTN only): fp8_e4m3, nvfp4, mxfp4
    group_size: int = -1  # -1: one scale per output channel (the tiny models' widths are not multiples of 128)
    sym: bool = False
    select: str | None = None  # only checkpoints whose name contains this
    eval_windows: int = 128
    seqlen: int = 512
    calib_samples: int = 64
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    source: str  # a folder or a Hub model id
    revision: str | None
    n_params: float
    tokens: float
    meta: dict


def check_precision(cfg: PrecisionConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UserError(f"methods={cfg.methods}: {unknown} unknown; choose from {', '.join(METHODS)}")
    bad = [b for b in cfg.bits if not isinstance(b, int) or not 2 <= b <= 8]
    if bad:
        raise UserError(f"bits={cfg.bits}: integer weights take 2..8 bits")
    for method, bits in (cfg.method_bits or {}).items():
        if method not in cfg.methods or not set(bits) <= set(cfg.bits):
            raise UserError(f"method_bits.{method}={bits} must name a method in methods and a subset of bits")
    bad = [f for f in cfg.formats if f not in FLOAT_FORMATS]
    if bad:
        raise UserError(f"formats={cfg.formats}: choose from {', '.join(FLOAT_FORMATS)}")
    if (cfg.data is None) == (cfg.text is None):
        raise UserError("give exactly one of data=<prepared corpus> (ptq.study prepare) or text=<a .txt file>")
    if cfg.text is not None and not Path(cfg.text).is_file():
        raise UserError(f"text={cfg.text} is not a file")


def find_checkpoints(spec, select: str | None = None) -> list[Checkpoint]:
    """Trained checkpoints under a folder (their ``study.json``), or the entries of a list."""
    found = []
    if isinstance(spec, str | Path):
        folder = Path(spec)
        if not folder.is_dir():
            raise UserError(f"checkpoints={spec} is not a folder; train some with python -m ptq.study train")
        for meta_path in sorted(folder.glob("*/study.json")):
            meta = json.loads(meta_path.read_text())
            found.append(Checkpoint(meta["name"], str(meta_path.parent), None, meta["n_params"], meta["tokens"], meta))
    else:
        for i, entry in enumerate(spec):
            entry = dict(entry)
            missing = [k for k in ("n_params", "tokens") if k not in entry]
            source = entry.get("path") or entry.get("model")
            if missing or not source:
                raise UserError(
                    f"checkpoints[{i}] needs path (or model), n_params and tokens; missing {missing or ['path']}"
                )
            name = entry.get("name") or f"{Path(source).name}{'-' + entry['revision'] if entry.get('revision') else ''}"
            meta = {"kind": "precision-checkpoint", "schedule": entry.get("schedule", "unknown"), "p_train": None,
                    **entry, "name": name}  # fmt: skip
            found.append(Checkpoint(name, source, entry.get("revision"), entry["n_params"], entry["tokens"], meta))
    if select:
        found = [c for c in found if select in c.name]
    if not found:
        raise UserError(f"checkpoints={spec} holds no checkpoints{f' matching select={select}' if select else ''}")
    return found


def points_of(cfg: PrecisionConfig) -> list[tuple[str, str, int]]:
    """(method, format, bits) of every point to measure per checkpoint."""
    points = []
    for method in cfg.methods:
        for bits in (cfg.method_bits or {}).get(method, cfg.bits):
            points.append((method, "int", bits))
    for fmt in cfg.formats:
        points.append(("rtn", fmt, 4 if "fp4" in fmt else 8))
    return points


def load_checkpoint(ckpt: Checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq import hub

    kwargs = {"revision": ckpt.revision} if ckpt.revision else {}
    if not Path(ckpt.source).exists() and not hub.reachable():
        raise UserError(
            f"checkpoint {ckpt.source} is not a local folder and the Hugging Face Hub is unreachable; give its "
            "local path as checkpoints[].path"
        )
    model = AutoModelForCausalLM.from_pretrained(ckpt.source, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.source, **kwargs)
    return model.eval(), tokenizer


def token_sets(cfg: PrecisionConfig, tokenizer, corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration source ids [1, n], evaluation windows [eval_windows, seqlen])."""
    if corpus is not None:
        calib_ids = torch.from_numpy(corpus.tokens("train", 20_000_000).astype(np.int64))[None]
        val = corpus.tokens("val", cfg.eval_windows * cfg.seqlen)
    else:
        from ptq.data import tokenize

        ids = tokenize(tokenizer, Path(cfg.text).read_text())[0]
        split = int(len(ids) * 0.9)
        calib_ids, val = ids[None, :split], ids[split:].numpy()
    n = min(cfg.eval_windows, len(val) // cfg.seqlen)
    if n < 1:
        raise UserError(f"the evaluation text is shorter than one window of seqlen={cfg.seqlen} tokens")
    windows = torch.from_numpy(np.asarray(val[: n * cfg.seqlen], dtype=np.int64)).view(n, cfg.seqlen)
    return calib_ids, windows


def mean_loss(model, windows: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """Mean next-token negative log-likelihood in nats per token (ptq's perplexity code, accumulated in fp64)."""
    from ptq.eval.perplexity import token_nll

    with torch.no_grad():
        return token_nll(model, windows, device, batch_size=batch_size).double().mean().item()


def record_path(out: Path, ckpt: Checkpoint, method: str, fmt: str, bits: int) -> Path:
    return out / "records" / ckpt.name / f"{method}_{fmt}{bits if fmt == 'int' else ''}.json"


def weights_digest(ckpt: Checkpoint) -> str:
    """The checkpoint's weights by content (a Hub checkpoint by name and revision): a retrained model is measured
    again, a copied one is not."""
    import hashlib

    folder = Path(ckpt.source)
    if not folder.is_dir():
        return f"{ckpt.source}@{ckpt.revision or 'main'}"
    h = hashlib.sha256()
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _settings(cfg: PrecisionConfig, method: str, fmt: str, bits: int, weights: str) -> dict:
    return {"weights": weights,
        "method": method, "format": fmt, "bits": bits, "group_size": cfg.group_size if fmt == "int" else None,
        "sym": cfg.sym if fmt == "int" else True, "eval_windows": cfg.eval_windows, "seqlen": cfg.seqlen,
        "calib_samples": cfg.calib_samples, "seed": cfg.seed, "data": cfg.data, "text": cfg.text,
    }  # fmt: skip


def _done(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == settings
    except (OSError, json.JSONDecodeError):
        return False


def run_precision(cfg: PrecisionConfig) -> list[Path]:
    """Measure every point not yet recorded; returns the record paths of all points (old and new)."""
    from ptq.api import quantize, resolve_device
    from ptq.data import sample_windows
    from ptq.results import environment
    from ptq.study.corpus import Corpus

    check_precision(cfg)
    checkpoints = find_checkpoints(cfg.checkpoints, cfg.select)
    corpus = Corpus.open(cfg.data) if cfg.data else None
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    points = points_of(cfg)
    env = environment(device)
    paths = []
    corpus_sets = None  # the corpus's calibration text and evaluation windows serve every checkpoint
    for ckpt in checkpoints:
        weights = weights_digest(ckpt)
        todo = [
            (m, f, b)
            for m, f, b in points
            if not _done(record_path(out, ckpt, m, f, b), _settings(cfg, m, f, b, weights))
        ]
        paths += [record_path(out, ckpt, m, f, b) for m, f, b in points]
        if not todo:
            continue
        model, tokenizer = load_checkpoint(ckpt)
        if corpus is not None and ckpt.meta.get("tokenizer_sha256") not in (None, corpus.meta["tokenizer_sha256"]):
            raise UserError(f"checkpoint {ckpt.name} was trained with another tokenizer than data={cfg.data}")
        if corpus is None:
            calib_ids, windows = token_sets(cfg, tokenizer, None)
        else:
            corpus_sets = corpus_sets or token_sets(cfg, tokenizer, corpus)
            calib_ids, windows = corpus_sets
        calib, offsets = sample_windows(calib_ids, cfg.calib_samples, cfg.seqlen, cfg.seed)
        started = time.perf_counter()
        loss_fp = mean_loss(model, windows, device, cfg.batch_size)
        fp_seconds = time.perf_counter() - started
        original = copy.deepcopy(model.state_dict())
        for method, fmt, bits in todo:
            model.load_state_dict(original)
            started = time.perf_counter()
            report = quantize(
                model, method=method, format=fmt, bits=bits if fmt == "int" else None,
                group_size=cfg.group_size if fmt == "int" else None, sym=cfg.sym if fmt == "int" else None,
                calib=calib, device=device, batch_size=cfg.batch_size,
            )  # fmt: skip
            quantize_s = time.perf_counter() - started
            started = time.perf_counter()
            loss = mean_loss(model, windows, device, cfg.batch_size)
            record = {
                "kind": "precision-point",
                "study": cfg.study,
                "checkpoint": {k: ckpt.meta.get(k) for k in ("name", "size", "n_params", "n_params_total", "tokens",
                                                             "schedule", "p_train", "seed", "epochs", "val_loss")}
                | {"source": ckpt.source, "revision": ckpt.revision},
                "method": method,
                "format": fmt,
                "bits": bits,
                "group_size": cfg.group_size if fmt == "int" else None,
                "bits_per_weight": report["storage"].get("bits_per_weight"),
                "settings": _settings(cfg, method, fmt, bits, weights),
                "metrics": {
                    "val_loss": loss, "val_loss_fp": loss_fp, "delta_loss": loss - loss_fp,
                    "ppl": math.exp(loss), "ppl_fp": math.exp(loss_fp),
                },
                "eval": {"windows": int(windows.shape[0]), "seqlen": cfg.seqlen,
                         "tokens": int(windows.shape[0] * (cfg.seqlen - 1)), "split": "val" if corpus else "text"},
                "calibration": {"samples": cfg.calib_samples, "seqlen": cfg.seqlen, "seed": cfg.seed,
                                "offsets": offsets},
                "timings": {"quantize_s": quantize_s, "eval_s": time.perf_counter() - started,
                            "eval_fp_s": fp_seconds},
                "environment": env,
            }  # fmt: skip
            path = record_path(out, ckpt, method, fmt, bits)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.rename(path)
            log.info("%s %s %s%s: δ = %.4f nats/token", ckpt.name, method, fmt, bits, loss - loss_fp)
        del model, original
    return paths

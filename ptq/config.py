"""Typed run configuration, built from Hydra's composed YAML and validated before any heavy work.

Every check raises ConfigError with one sentence naming the setting and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ptq.data import CALIB_SETS, check_eval_source
from ptq.errors import UserError
from ptq.methods import METHODS
from ptq.moe import MoEPolicy
from ptq.pipeline import ACTIVATION_PLACES
from ptq.quant.pack import PACKED_BITS
from ptq.recipe import Recipe
from ptq.storage import compressed_tensors
from ptq.storage.shards import parse_size

TASK_SOURCES = ("auto", "hub", "local")
SAVE_FORMATS = ("compressed-tensors", "gptq")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(UserError):
    """A setting is invalid; the message names it and says how to fix it."""


@dataclass
class ModelConfig:
    name: str | None = None  # preset name, for the record
    path: str | None = None  # a local folder or a hub id; overrides the preset's sources
    gguf_file: str | None = None  # a GGUF file inside ``path``
    hub_id: str | None = None  # the preset's hub id
    assets_dir: str | None = None  # the preset's copy, relative to paths.assets
    assets_gguf_file: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on CUDA


@dataclass
class CalibConfig:
    name: str | None = "wikitext2_valid"  # a calibration set (see ptq.data.CALIB_SETS)
    path: str | None = None  # or any local .txt / .jsonl file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8  # windows per block forward in the pipeline
    # where the calibration activations live: auto (in host memory with offload=true, else on the device),
    # host, or device (with offload=true: only the model is offloaded)
    activations: str = "auto"


@dataclass
class EvalConfig:
    ppl: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int | None = None  # default: the model's context, capped at 2048
    max_windows: int | None = None  # None = the whole test set (the paper protocol)
    batch_size: int | str = (
        "auto"  # lm-eval requests per batch ("auto": largest that fits); perplexity: auto = 1 window
    )
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks, e.g. [piqa, arc_easy]
    limit: int | float | None = None  # lm-eval: first N documents per task (or a fraction), for quick runs
    num_fewshot: int | None = None  # lm-eval: None = each task's default (0 for these tasks)
    task_source: str = "auto"  # auto: the hub if reachable, else local files | hub | local
    task_data: str | None = None  # folder with the local task files (default: <assets>/data)
    max_length: int | None = None  # lm-eval: longest input in tokens (default: the model's context)
    baseline: bool = True  # also evaluate the full-precision model, for the comparison table
    task_include: str | None = None  # a folder of the user's own lm-eval task YAML files
    task_files: dict = field(default_factory=dict)  # a local task's files by task: {arc_easy: /data/dev.jsonl}
    per_example: bool = False  # also record each window's loss and the loss by position (report --where-it-hurts)


@dataclass
class CacheConfig:
    enabled: bool = True  # reuse tokenized text, calibration windows and full-precision scores
    dir: str | None = None  # default: $PTQ_CACHE, else ~/.cache/ptq


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: Recipe = field(default_factory=Recipe)  # method, weight and activation formats, options
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    moe: MoEPolicy = field(default_factory=MoEPolicy)  # how a mixture-of-experts model's experts are calibrated
    experiment: dict | None = None  # experiment=<preset>: name, source, metric, published numbers
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    offload: bool = False
    save: bool = False  # also write the quantized model to <output_dir>/model
    save_format: str = "compressed-tensors"  # compressed-tensors (transformers, vLLM) | gptq
    max_shard_size: str = "5GB"  # the largest safetensors file a saved checkpoint has
    seed: int = 0
    output_dir: str = "runs/latest"
    overwrite: bool = False  # replace a finished run's result.json in output_dir (refused otherwise)
    resume: bool = False  # continue the interrupted run in output_dir from its last finished block
    progress: bool = True  # save each finished block to output_dir/progress/ (what resume continues from)
    assets: str | None = None  # paths.assets

    @property
    def full_precision(self) -> bool:
        return self.recipe.full_precision

    def assets_root(self) -> Path:
        return Path(self.assets or os.environ.get("PTQ_ASSETS") or REPO_ROOT.parent / "shared" / "assets")

    def to_dict(self) -> dict:
        """The settings as a record stores them: the recipe's fields at the top level."""
        d = asdict(self)
        del d["recipe"]
        return {**self.recipe.to_dict(), "method_options": self.recipe.options, **d}


RECIPE_SETTINGS = (
    "method", "format", "bits", "group_size", "sym", "act_format", "act_bits", "act_granularity", "kv_format", "kv_bits"
)  # fmt: skip


def _require_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be a whole number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")


def validate(cfg: RunConfig) -> RunConfig:
    if cfg.experiment is not None:
        check_experiment(cfg.experiment)
    for name in ("save", "offload", "overwrite", "resume", "progress"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name}={getattr(cfg, name)!r} must be true or false")
    if cfg.resume and not cfg.progress:
        raise ConfigError("resume=true continues from the blocks a run saves with progress=true: drop progress=false")
    if cfg.save and cfg.recipe.weights is None:
        raise ConfigError("save=true needs a quantized model: choose a method and bits below 16")
    if cfg.save and cfg.recipe.kv is not None:
        raise ConfigError("save=true cannot hold KV-cache quantization (kv_bits, kv_format) yet: drop it or save=false")
    if cfg.save and "quarot" in cfg.recipe.steps:
        raise ConfigError(
            "save=true: QuaRot's online Hadamard on the input of down_proj has no place in the formats ptq writes "
            "(the GPTQ layout cannot express it; compressed-tensors' transform_config is not written yet): save=false"
        )
    try:
        if parse_size(cfg.max_shard_size) <= 0:
            raise ConfigError(f"max_shard_size={cfg.max_shard_size!r} must be more than 0 bytes")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.save_format not in SAVE_FORMATS:
        raise ConfigError(f"save_format={cfg.save_format!r} is unknown; choose one of {', '.join(SAVE_FORMATS)}")
    if cfg.save and cfg.save_format == "compressed-tensors":
        try:
            compressed_tensors.check_savable(cfg.recipe.weights, cfg.recipe.activations)
            compressed_tensors.gptq_actorder(cfg.recipe)
        except ValueError as err:
            raise ConfigError(f"save=true: {err} (or save=false)") from None
    own_layout = {"spqr": "SpQR's outliers and quantized statistics", "aqlm": "AQLM's codes and codebooks"}
    for step in cfg.recipe.steps:
        if cfg.save and step in own_layout:
            raise ConfigError(
                f"save=true: {own_layout[step]} have no checkpoint layout that ptq writes; drop save (the record "
                "holds the quality and the exact bits per weight)"
            )
    weights = cfg.recipe.weights
    gptq_layout = cfg.save and cfg.save_format == "gptq"
    if gptq_layout and not (weights.is_int and weights.bits in PACKED_BITS):
        raise ConfigError(
            f"save=true: {weights.describe()} has no packed GPTQ layout; the formats that do are integer "
            f"bits={', '.join(map(str, PACKED_BITS))} (or save=false)"
        )
    if gptq_layout and cfg.recipe.activations is not None:
        raise ConfigError(
            "save=true writes weight-only GPTQ checkpoints, which cannot hold activation quantization: "
            "drop the activation format (scheme), or save=false"
        )
    if not isinstance(cfg.cache.enabled, bool):
        raise ConfigError(f"cache.enabled={cfg.cache.enabled!r} must be true or false")
    if not isinstance(cfg.device, str) or not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is unknown; choose auto, cpu, cuda or cuda:N")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    if not (cfg.model.path or cfg.model.hub_id or cfg.model.assets_dir):
        raise ConfigError("no model given: choose a preset (model=<name>) or set model.path=<folder or hub id>")
    c = cfg.calib
    _require_int("calib.nsamples", c.nsamples, 1)
    _require_int("calib.seqlen", c.seqlen, 2)
    _require_int("calib.seed", c.seed)
    _require_int("calib.batch_size", c.batch_size, 1)
    if c.activations not in ACTIVATION_PLACES:
        raise ConfigError(
            f"calib.activations={c.activations!r} is unknown; choose one of {', '.join(ACTIVATION_PLACES)}"
        )
    if c.path is None and c.name not in CALIB_SETS:
        raise ConfigError(
            f"calib={c.name!r} is unknown; choose one of {', '.join(sorted(CALIB_SETS))}, "
            "or set calib.path=<.txt|.jsonl file>"
        )
    e = cfg.eval
    if isinstance(e.ppl, str):
        e.ppl = [e.ppl]
    for source in e.ppl:
        try:
            check_eval_source(str(source))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if e.seqlen is not None:
        _require_int("eval.seqlen", e.seqlen, 2)
    if e.max_windows is not None:
        _require_int("eval.max_windows", e.max_windows, 1)
    if e.batch_size != "auto":
        _require_int("eval.batch_size", e.batch_size, 1)
    if isinstance(e.tasks, str):
        e.tasks = [e.tasks]
    if e.task_source not in TASK_SOURCES:
        raise ConfigError(f"eval.task_source={e.task_source!r} is unknown; choose one of {', '.join(TASK_SOURCES)}")
    if e.max_length is not None:
        _require_int("eval.max_length", e.max_length, 2)
    if e.num_fewshot is not None:
        _require_int("eval.num_fewshot", e.num_fewshot, 0)
    if e.limit is not None and (isinstance(e.limit, bool) or not isinstance(e.limit, (int, float)) or e.limit <= 0):
        raise ConfigError(f"eval.limit={e.limit!r} must be a positive number of documents (or a fraction below 1)")
    if e.tasks and cfg.offload:
        raise ConfigError("eval.tasks needs the model on one device; with offload=true use eval.tasks=[] for now")
    return cfg


def check_experiment(experiment: dict) -> None:
    """An experiment preset: ``metric`` is a path into a record's metrics (``ppl.wikitext2``,
    ``tasks.piqa.acc``); ``published`` maps model -> "<method>-w<bits>" (or "fp16") -> number."""
    missing = {"name", "metric", "published"} - set(experiment)
    if missing:
        raise ConfigError(f"experiment is missing {sorted(missing)}; see ptq/conf/experiment/ for the layout")
    for model, values in (experiment["published"] or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"experiment.published.{model}.{key}={value!r} must be a number")


def check_context(cfg: RunConfig, context: int | None, uses_calibration: bool) -> None:
    """Sequence lengths must fit the model's context (known once its config is read)."""
    if context is None:
        return
    if uses_calibration and cfg.calib.seqlen > context:
        raise ConfigError(f"calib.seqlen={cfg.calib.seqlen} is above the model's context of {context} tokens")
    if cfg.eval.seqlen is not None and cfg.eval.seqlen > context:
        raise ConfigError(f"eval.seqlen={cfg.eval.seqlen} is above the model's context of {context} tokens")


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in {where}; known: {', '.join(sorted(known))}")
    return cls(**values)


def build_recipe(d: dict, method: str, options: dict) -> Recipe:
    """The recipe from the composed settings (popped from ``d``); the one place loose settings become specs."""
    settings = {key: d.pop(key, None) for key in RECIPE_SETTINGS if key != "method"}
    for key in ("bits", "group_size", "act_bits", "kv_bits"):
        if settings[key] is not None:
            _require_int(key, settings[key])
    for key in ("format", "act_format", "act_granularity", "kv_format"):
        if settings[key] is not None and not isinstance(settings[key], str):
            raise ConfigError(f"{key}={settings[key]!r} must be a name")
    try:
        return Recipe.build(method, settings.pop("format") or "int", **settings, options=options)
    except ValueError as err:
        raise ConfigError(str(err)) from None


MISSING = "???"  # Hydra's mark of a value a preset leaves to the user
MISSING_HINTS = {
    "model.path": "model=custom needs model.path=<folder with config.json and weights>",
    "calib.path": "calib=file needs calib.path=<.txt file, or .jsonl file with a 'text' field>",
}


def missing_settings(d: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in d.items():
        if isinstance(value, dict):
            found += missing_settings(value, f"{prefix}{key}.")
        elif value == MISSING:
            found.append(f"{prefix}{key}")
    return found


def from_dict(d: dict) -> RunConfig:
    """Build a RunConfig from Hydra's resolved config (a plain dict) and validate it."""
    d = dict(d)
    d.pop("hydra", None)
    missing = missing_settings(d)
    if missing:
        raise ConfigError(f"{missing[0]} is not set: {MISSING_HINTS.get(missing[0], f'set {missing[0]}=<value>')}")
    method = dict(d.pop("method", {}) or {})
    name = method.pop("name", None)
    if not name:
        raise ConfigError("method has no name; choose method=<name>")
    unknown_steps = [k for k in method if k not in METHODS]
    if unknown_steps:
        raise ConfigError(f"unknown method options {unknown_steps}; options go under method.<step>.<option>")
    options = {k: dict(v or {}) for k, v in method.items()}
    recipe = build_recipe(d, name, options)
    paths = d.pop("paths", {}) or {}
    cfg = _build(
        RunConfig,
        {
            **d,
            "model": _build(ModelConfig, d.get("model", {}), "model"),
            "calib": _build(CalibConfig, d.get("calib", {}), "calib"),
            "eval": _build(EvalConfig, d.get("eval", {}), "eval"),
            "cache": _build(CacheConfig, d.get("cache", {}) or {}, "cache"),
            "moe": _build(MoEPolicy, d.get("moe", {}) or {}, "moe"),
            "recipe": recipe,
            "assets": paths.get("assets"),
        },
        "the top-level config",
    )
    return validate(cfg)

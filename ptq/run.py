"""``python -m ptq.run method=gptq scheme=nvfp4a16``: Hydra's entry point.

Glue only: the stages of a run live in ptq/job.py, the algorithms in ptq/methods, the executor in
ptq/pipeline.py.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ptq.api import leave_ranks
from ptq.config import from_dict
from ptq.errors import DiskFullError, UserError
from ptq.job import run
from ptq.report import console_table
from ptq.results import write_json
from ptq.storage.progress import Progress

log = logging.getLogger("ptq")


def tag(method: str, format: str, bits, group_size, act_format, act_bits) -> str:
    """A short name for a run folder: int4_g128, nvfp4, fp8_e4m3_g-1_a-fp8_e4m3, int8_g-1_a-int8 ..."""
    if method == "none":
        return "fp"
    weights = f"int{bits or 4}_g{128 if group_size is None else group_size}" if format == "int" else format
    if format != "int" and group_size is not None:
        weights += f"_g{group_size}"
    if act_format or act_bits:
        weights += f"_a-{act_format or 'int'}{act_bits or ''}"
    return weights


OmegaConf.register_new_resolver("ptq.tag", tag, replace=True)


FAILED_JOBS: list[str] = []  # a sweep's failed jobs (the basic launcher runs them all in this process)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_device(device: str, job_num: int | None, gpus: int) -> str:
    """The device of one job of a sweep: with ``device=auto`` on a machine with several GPUs, job n takes
    cuda:(n mod GPUs), so that jobs run side by side (``hydra/launcher=joblib hydra.launcher.n_jobs=<GPUs>``) each
    have their own GPU. Any other setting, a single run or torchrun's ranks keep the device as given."""
    if device != "auto" or job_num is None or gpus < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return device
    return f"cuda:{job_num % gpus}"


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> str | None:
    """Why this run may not use ``output_dir`` (one sentence), or None: a finished run's record is never
    replaced, nor an interrupted run's finished blocks, unless asked (overwrite=true, resume=true), and the
    folder must be writable before any work starts."""
    if (output_dir / "result.json").is_file() and not overwrite:
        return (
            f"output_dir={output_dir} holds a finished run (result.json); choose another output_dir, or set "
            "overwrite=true to replace it (resume=true continues only an interrupted run)"
        )
    saved = Progress.blocks_saved(output_dir)
    if saved is not None and not (overwrite or resume):
        return (
            f"output_dir={output_dir} holds an interrupted run ({saved} finished block(s) in progress/); set "
            "resume=true to continue it, or overwrite=true to start over"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".ptq-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"output_dir={output_dir} is not writable ({err.strerror or err}); choose a folder you can write to"
    return None


# Hydra flags after which the command line is not a list of overrides: Hydra itself deals with those.
_HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--resolve", "-cp", "--config-path",
                "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package", "--shell-completion", "-sc",
                "--experimental-rerun", "--version")  # fmt: skip


def _sweep_samples(overrides: list[str]) -> list[list[str]]:
    """Override lists that together use every value of every swept setting once (not their product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]  # fmt: skip
    longest = max((len(c) for c in choices), default=1)
    return [[c[min(i, len(c) - 1)] for c in choices] for i in range(longest)]


def _one_sentence(err: Exception, arg: str, known: list[str], command: str = "python -m ptq.run") -> str:
    import difflib

    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    options = getattr(err, "options", None)
    if options:  # an unknown preset in a config group: method=foo, hydra/launcher=joblib
        group = first.split("Could not find '")[-1].rsplit("/", 1)[0].rstrip("'")
        return f"{arg} is not a {group} preset; choose one of: {', '.join(options)}"
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{key} is not a ptq setting; {hint}{command} --cfg job lists them all"
    if first.startswith("Ambiguous value for argument"):
        return f"{arg}: a list of values needs -m (a sweep over them) or brackets ([a,b]) for a list setting"
    return f"{arg} is not a valid override ({first})"


def check_overrides(
    args: list[str], module: str = "ptq.conf", name: str = "config", command: str = "python -m ptq.run"
) -> str | None:
    """Hydra's composition errors (an unknown setting, ``bitz=4``; an unknown preset, ``method=foo``; a
    malformed override) as one sentence, before Hydra runs, so that every refusal looks alike (exit 2).
    ``module``/``name``: the config to compose (``ptq.study``'s commands have their own)."""
    if any(a.split("=")[0] in _HYDRA_FLAGS for a in args):
        return None
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [a for a in args if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        jobs = _sweep_samples(overrides) if multirun else [overrides]
    except HydraException as err:
        return _one_sentence(err, " ".join(overrides), [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(module, version_base=None):
            for job in jobs:
                try:
                    compose(name, overrides=job, return_hydra_config=True)
                    continue
                except HydraException:
                    pass
                known = _setting_names(OmegaConf.to_container(compose(name), resolve=False))
                for i in range(len(job)):  # one override at a time, to name the one at fault
                    try:
                        compose(name, overrides=job[: i + 1], return_hydra_config=True)
                    except HydraException as err:
                        return _one_sentence(err, job[i], known, command)
    finally:
        GlobalHydra.instance().clear()
    return None


def _setting_names(cfg: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in cfg.items():
        names.append(prefix + str(key))
        if isinstance(value, dict):
            names += _setting_names(value, f"{prefix}{key}.")
    return names


def named_settings() -> list[str]:
    """The settings this job's command line names (``calib.path`` for ``calib.path=/x``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(hydra_cfg: DictConfig) -> None:
    container = OmegaConf.to_container(hydra_cfg, resolve=True)
    output_dir = Path(container.get("output_dir") or ".")
    refusal = check_output_dir(output_dir, bool(container.get("overwrite")), bool(container.get("resume")))
    if refusal:  # nothing is written or removed: the folder is someone's finished run, or not ours to write
        print(f"error: {refusal}", file=sys.stderr)
        if _in_multirun():
            FAILED_JOBS.append(str(output_dir))
            return
        sys.exit(2)
    if _in_multirun():
        import torch
        from hydra.core.hydra_config import HydraConfig

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        container["device"] = job_device(container.get("device", "auto"), HydraConfig.get().job.num, gpus)
    try:
        cfg = from_dict(container)
        record = run(cfg, named_settings())
    except Exception as err:
        expected = isinstance(err, UserError)
        (output_dir / "result.json").unlink(missing_ok=True)  # no earlier success may stand beside this failure
        try:
            write_json(
                output_dir / "error.json",
                {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": None if expected else traceback.format_exc(),
                    "config": container,
                },
            )
        except OSError:  # a full disk may refuse error.json too: the message below still says what happened
            pass
        if not expected:
            raise
        print(f"error: {err}", file=sys.stderr)
        saved = Progress.blocks_saved(output_dir)
        if saved and not isinstance(err, DiskFullError):  # DiskFullError says so itself
            kept = output_dir / "progress"
            print(f"{saved} finished block(s) are kept in {kept}: resume=true continues", file=sys.stderr)
        if _in_multirun():
            FAILED_JOBS.append(str(output_dir / "error.json"))
            return  # keep the sweep going; the failure is recorded in error.json
        sys.exit(2)
    if record is not None:  # (torchrun: rank 0 alone evaluates and writes the record)
        print(console_table(record))
        print(output_dir / "result.json")


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
    leave_ranks()
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        sys.exit(2)

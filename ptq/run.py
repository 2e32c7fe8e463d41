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

from ptq.config import from_dict
from ptq.errors import UserError
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


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(hydra_cfg: DictConfig) -> None:
    container = OmegaConf.to_container(hydra_cfg, resolve=True)
    output_dir = Path(container.get("output_dir") or ".")
    refusal = check_output_dir(output_dir, bool(container.get("overwrite")), bool(container.get("resume")))
    if refusal:  # nothing is written or removed: the folder is someone's finished run, or not ours to write
        print(f"error: {refusal}", file=sys.stderr)
        if _in_multirun():
            return
        sys.exit(2)
    try:
        cfg = from_dict(container)
        record = run(cfg)
    except Exception as err:
        expected = isinstance(err, UserError)
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
    print(console_table(record))
    print(output_dir / "result.json")


if __name__ == "__main__":
    main()

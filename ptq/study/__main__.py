"""``python -m ptq.study <prepare|train|precision|fit> key=value ...``: the precision-scaling study (Hydra).

    prepare    books (.txt) -> tokenizer + uint16 token shards              (ptq/study/corpus.py)
    train      small Llama models, checkpoints at several token budgets     (ptq/study/train.py)
    precision  every checkpoint x method x bits -> one record per point     (ptq/study/precision.py)
    fit        the records -> fit.json (Kumar et al.'s law, bootstrap) + plots (ptq/study/fit.py, plots.py)

Each command's settings and defaults: ptq/conf/study/<command>.yaml.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields

import hydra
from omegaconf import DictConfig, OmegaConf

from ptq.errors import UserError
from ptq.run import check_overrides

log = logging.getLogger("ptq.study")
COMMANDS = ("prepare", "train", "precision", "fit")


def _build(cls, values: dict, command: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting(s) {unknown} for ptq.study {command}; known: {', '.join(sorted(known))}")
    missing = sorted(k for k, v in values.items() if v == "???")
    if missing:
        raise UserError(f"ptq.study {command} needs {', '.join(f'{k}=...' for k in missing)}")
    return cls(**values)


def run_command(command: str, values: dict):
    """One subcommand on plain settings (what the CLI does after Hydra composed them)."""
    if command == "prepare":
        from ptq.study.corpus import PrepareConfig, prepare

        return prepare(_build(PrepareConfig, values, command))
    if command == "train":
        from ptq.study.train import TrainConfig, train

        return train(_build(TrainConfig, values, command))
    if command == "precision":
        from ptq.study.precision import PrecisionConfig, run_precision

        return run_precision(_build(PrecisionConfig, values, command))
    if command == "fit":
        return fit_command(**values)
    raise UserError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")


def fit_command(study: str, records: str, samples: int = 1000, seed: int = 0, floor: float = 1e-4) -> dict:
    import json
    from pathlib import Path

    from ptq.study.fit import load_points, write_fit
    from ptq.study.plots import write_study_plots
    from ptq.study.summary import write_summary

    folder = Path(records)
    points = load_points(folder)
    if not points:
        raise UserError(f"records={records} holds no precision-point records; run python -m ptq.study precision first")
    path = write_fit(points, folder, samples=samples, seed=seed, floor=floor, study=study)
    fit = json.loads(path.read_text())  # the plots and the summary show what fit.json says
    paths = write_study_plots(points, fit, folder)
    write_summary(points, fit, folder / "summary.md")
    for written in [path, folder / "summary.md", *paths]:
        print(written)
    return fit


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m ptq.study {{{'|'.join(COMMANDS)}}} key=value ...", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    problem = check_overrides(sys.argv[1:], "ptq.conf.study", command, f"python -m ptq.study {command}")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

    def task(cfg: DictConfig) -> None:
        values = OmegaConf.to_container(cfg, resolve=True)
        try:
            run_command(command, values)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    hydra.main(version_base=None, config_path="pkg://ptq.conf.study", config_name=command)(task)()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()

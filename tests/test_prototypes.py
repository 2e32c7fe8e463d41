"""The kernel prototypes in ``scripts/`` (not used by the package), each through its own check in Triton's
interpreter: ``mlp_one_token.py``, the one-launch W4A16 MLP (against gate_up, SiLU·up and down through ptq's
layers, twice, so that the atomically summed buffer and the arrival counter are found reset)."""

from pathlib import Path

import pytest

from tests.conftest import run_interpreted

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_the_one_launch_mlp_matches_the_three_layers_in_the_interpreter():
    done = run_interpreted(str(SCRIPTS / "mlp_one_token.py"))
    errors = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if "relative error" in line]
    assert len(errors) == 4 and max(errors) < 1e-5

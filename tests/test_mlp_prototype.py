"""``scripts/mlp_one_token.py``, the one-launch W4A16 MLP prototype: its own check (the kernel against gate_up,
SiLU·up and down through ptq's layers, twice, so that the atomically summed buffer and the arrival counter are
found reset) in Triton's interpreter, in a child process (the interpreter is chosen when kernels are defined)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

SCRIPT = Path(__file__).parents[1] / "scripts" / "mlp_one_token.py"


def test_the_one_launch_mlp_matches_the_three_layers_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if "relative error" in line]
    assert len(errors) == 4 and max(errors) < 1e-5

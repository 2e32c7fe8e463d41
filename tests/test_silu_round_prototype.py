"""``scripts/silu_round_rows.py``, the one-launch SiLU * up and per-token rounding of a W8A8 MLP's down input: its
own check (codes and scales against ``fp8_rows`` / ``int8_rows`` of torch's SiLU * up, fp32 and bf16, E4M3 and
int8) in Triton's interpreter, in a child process (the interpreter is chosen when kernels are defined)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

SCRIPT = Path(__file__).parents[1] / "scripts" / "silu_round_rows.py"


def test_the_one_launch_rounding_gives_the_layers_codes_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("codes differing") == 6

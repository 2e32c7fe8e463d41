"""How far a W8A8 model's logits move with the products' summation order: a tiny random Llama's logits at 1 and 16
tokens through the separate layers on ptq's kernels, through the joined ones (``ptq.fuse``), and through the
dequantize path (``PTQ_KERNELS=0``), each in its own process; prints the three relative differences per format.

    python scripts/fused_logits_check.py --formats fp8,w8a8

Needs CUDA. The model is ``tests/test_gpu.py``'s (``test_joined_projections_on_the_kernels_and_in_a_cuda_graph``)."""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def logits(fmt: str, fused: bool, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptq.bench.infer import convert
    from ptq.fuse import fuse_projections

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    convert(model, fmt, group_size=128)
    ids = torch.randint(0, 256, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        if fused:
            fuse_projections(model)
        torch.save([model(input_ids=ids[:, :n]).logits.float().cpu() for n in (1, 16)], out)


def relative(a: list, b: list) -> str:
    return ", ".join(f"{((x - y).norm() / y.norm()).item():.4f}" for x, y in zip(a, b, strict=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="fp8,w8a8")
    p.add_argument("--child", nargs=3, metavar=("FORMAT", "FUSED", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fmt, fused, out = args.child
        return logits(fmt, fused == "1", out)
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats.split(","):
            runs = {}
            for name, fused, kernels in (("separate", "0", "1"), ("fused", "1", "1"), ("dequantize", "0", "0")):
                out = str(Path(folder) / f"{fmt}-{name}.pt")
                env = {**os.environ, "PTQ_KERNELS": kernels}
                subprocess.run([sys.executable, __file__, "--child", fmt, fused, out], env=env, check=True)
                runs[name] = torch.load(out)
            print(f"{fmt} (1 token, 16 tokens): fused vs separate {relative(runs['fused'], runs['separate'])}; "
                  f"separate vs dequantize {relative(runs['separate'], runs['dequantize'])}; "
                  f"fused vs dequantize {relative(runs['fused'], runs['dequantize'])}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Quantize a model with llm-compressor's GPTQModifier on exactly ptq's calibration windows, then
score it with ptq's perplexity protocol, so that the two implementations are compared on equal terms.

llm-compressor pins older transformers than ptq, so this runs in its own virtual environment:

    python3 -m venv /tmp/peervenv
    /tmp/peervenv/bin/pip install llmcompressor==0.14.0.1 gguf   # plus torch, as for ptq
    PYTHONPATH=. /tmp/peervenv/bin/python scripts/peer_llmcompressor.py --bits 4 --group-size 128 --out peer.json

Defaults are the GPTQ issue's protocol: smollm2-135m-instruct from the assets, 128 x 512 calibration
tokens from WikiText-2 validation (seed 0), perplexity on the first 24 WikiText-2 test windows of 2048.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch

from ptq import data, models
from ptq.config import REPO_ROOT
from ptq.data import EVAL_SETS
from ptq.eval.perplexity import perplexity

PRESETS = {  # name -> (assets folder, gguf file)
    "smollm2-135m-instruct": ("models/smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "stories260k": ("models/stories260K", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(PRESETS))
    parser.add_argument("--assets", default=str(REPO_ROOT.parent / "shared" / "assets"))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/ptq-peer", help="where a GGUF model is saved as a plain HF folder")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    assets = Path(args.assets)
    folder, gguf = PRESETS[args.model]
    source = models.ModelSource(str(assets / folder), gguf, "assets")
    if gguf:  # llm-compressor re-reads the model's config from its folder: give it a plain HF copy
        plain = Path(args.workdir) / args.model
        if not (plain / "config.json").is_file():
            dequantized = models.load_model(source, torch.float32)
            dequantized.hf_quantizer = None  # the GGUF weights are already dequantized to fp32
            dequantized.config.__dict__.pop("quantization_config", None)
            dequantized.save_pretrained(plain)
            models.load_tokenizer(source).save_pretrained(plain)
        source = models.ModelSource(str(plain), None, "local")
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, torch.float32)
    calib = data.load_calibration(tokenizer, "wikitext2_valid", None, args.nsamples, args.seqlen, 0, assets)
    ids = data.tokenize(tokenizer, data.load_text("wikitext2", EVAL_SETS, assets).joined)
    eval_seqlen = min(models.max_context_of(model.config) or 2048, 2048)
    windows = data.eval_windows(ids, eval_seqlen, args.eval_windows)

    rows = calib.input_ids.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=0.01,
        actorder=None,  # ptq's default (act_order=false)
        # SmolLM2's 576 columns are 4.5 groups of 128; ptq gives the partial last group its own scale.
        # llm-compressor refuses such shapes unless told to go on (its last group then is partial too).
        bypass_divisibility_checks=True,
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=args.nsamples,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
    )
    quantize_s = time.perf_counter() - start
    ppl = perplexity(model, windows, torch.device("cpu"))
    record = {  # the fields ptq.report reads, so peer and ptq records share one table
        "status": "ok",
        "peer": "llm-compressor GPTQModifier",
        "method": f"gptq (llm-compressor {version('llmcompressor')})",
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")},
        "model": args.model,
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "options": {"block_size": 128, "dampening_frac": 0.01, "actorder": None},
        "calibration": {
            "name": "wikitext2_valid",
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "offsets": calib.offsets,
        },
        "metrics": {"ppl": {"wikitext2": ppl}},
        "eval": {"seqlen": eval_seqlen, "windows": windows.shape[0]},
        "timings": {"quantize_s": quantize_s},
        "memory": {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "env": {"device": "cpu", "cpu_threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(
        f"{args.model} w{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'}: ppl {ppl:.3f}, "
        f"quantize {quantize_s:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()

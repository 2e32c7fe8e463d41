"""Models larger than host memory: the skeleton on the meta device, one block read from the shards at
a time, packed integers kept afterwards."""

import json

import torch

import ptq
from ptq.lazy import load_skeleton
from ptq.models import get_blocks
from ptq.quant.linear import QuantLinear
from tests.conftest import require_assets
from tests.test_checkpoint import packable_llama
from tests.test_cli import QUICK, ptq_run


def sharded(tmp_path, seed=0):
    model = packable_llama(seed)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards, as real checkpoints are
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    return model


def test_blocks_are_read_one_at_a_time_and_kept_packed(tmp_path):
    eager = sharded(tmp_path)
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    lazy = load_skeleton(str(tmp_path), torch.float32)
    blocks = get_blocks(lazy.model)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    assert not any(p.is_meta for p in lazy.model.model.embed_tokens.parameters())

    resident = []  # materialized (non-meta, unpacked) blocks whenever a block is read
    original_load = lazy.load

    def load(module):
        original_load(module)
        resident.append(sum(not any(p.is_meta for p in b.parameters()) and not _packed(b) for b in blocks))

    lazy.load = load
    ptq.quantize(lazy.model, method="gptq", bits=4, group_size=32, calib=calib, device="cpu", offload=True, lazy=lazy)
    assert resident == [1, 1] and lazy.peak_materialized_blocks == 1
    assert all(_packed(b) for b in blocks)
    ptq.quantize(eager, method="gptq", bits=4, group_size=32, calib=calib, device="cpu", offload=True)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = eager(x).logits, lazy.model(x).logits
    assert (got - want).norm() < 5e-3 * want.norm()  # fp16 scales of the packed weights
    checkpoint_bytes = sum(p.numel() * p.element_size() for p in packable_llama().state_dict().values())
    tied = packable_llama().lm_head.weight
    assert lazy.checkpoint.bytes_read == checkpoint_bytes - tied.numel() * tied.element_size()  # each read once


def _packed(block):
    return any(isinstance(m, QuantLinear) for m in block.modules())


def test_offload_run_reads_the_checkpoint_lazily_and_scores_like_the_resident_run(tmp_path):
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl", "data/wikitext-2/valid.tokens.txt")
    runs = {}
    for offload in ("false", "true"):
        out = tmp_path / offload
        proc = ptq_run(*QUICK, "method=gptq", "bits=4", "group_size=32", f"offload={offload}", "cache.enabled=false",
                       f"output_dir={out}", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs[offload] = json.loads((out / "result.json").read_text())
    lazy, resident = runs["true"], runs["false"]
    assert resident["lazy_load"] is None
    assert lazy["lazy_load"]["peak_blocks_in_memory"] == 1 and lazy["lazy_load"]["bytes_read"] > 0
    # The full-precision baseline, evaluated block by block from the shards, is the resident model's.
    base_lazy, base_resident = (r["baseline"]["metrics"]["ppl"]["wikitext2"] for r in (lazy, resident))
    assert abs(base_lazy / base_resident - 1) < 1e-5
    # Quantized: the packable linears (attention) now hold fp16 scales, the packed format's.
    q_lazy, q_resident = (r["metrics"]["ppl"]["wikitext2"] for r in (lazy, resident))
    assert abs(q_lazy / q_resident - 1) < 1e-3


def test_activation_quantizers_survive_packing(tmp_path):
    """offload=true with W8A8 from local shards: blocks are packed into QuantLinear modules, which must
    keep the input quantizers (else the model would be evaluated as W8A16 while the record says W8A8)."""
    from ptq.quant.activations import input_quantizer_of

    eager = sharded(tmp_path)
    settings = dict(method="rtn", bits=8, group_size=-1, sym=True, act_bits=8, device="cpu", offload=True)
    lazy = load_skeleton(str(tmp_path), torch.float32)
    ptq.quantize(lazy.model, lazy=lazy, **settings)
    packed = [m for b in get_blocks(lazy.model) for m in b.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 2 * 7 and all(input_quantizer_of(m) is not None for m in packed)
    seen = []  # what reaches the packed layer's forward: int8 codes times one scale per token
    packed[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    ptq.quantize(eager, **settings)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = eager(x).logits, lazy.model(x).logits
    assert (got - want).norm() < 5e-3 * want.norm()
    tokens = seen[0].reshape(-1, seen[0].shape[-1])
    codes = tokens / (tokens.abs().amax(dim=1, keepdim=True) / 127)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


def test_offloaded_lazy_run_saves_block_by_block_and_loads_back(tmp_path):
    """offload=true from local shards with save=true: each block is written when it is final (before it
    is packed), in shards of max_shard_size; the folder loads back with the run's perplexity."""
    require_assets("models/stories260K", "data/wikitext-2-raw-v1/test.jsonl", "data/wikitext-2/valid.tokens.txt")
    common = [*QUICK, "eval.baseline=false", "cache.enabled=false"]
    out = tmp_path / "q"
    proc = ptq_run(*common, "method=rtn", "bits=4", "group_size=-1", "sym=true", "offload=true", "save=true",
                   "max_shard_size=200KB", f"output_dir={out}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    quantized = json.loads((out / "result.json").read_text())
    assert quantized["lazy_load"]["peak_blocks_in_memory"] == 1
    shards = sorted((out / "model").glob("*.safetensors"))
    assert len(shards) > 1 and all(f.stat().st_size < 250_000 for f in shards)
    weight_map = json.loads((out / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in weight_map if k.endswith((".qweight", ".scales"))]  # no packed-layer leftovers
    proc = ptq_run(*common, "model=custom", f"model.path={out}/model", "method=none", f"output_dir={tmp_path}/l",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads((tmp_path / "l" / "result.json").read_text())
    want, got = quantized["metrics"]["ppl"]["wikitext2"], loaded["metrics"]["ppl"]["wikitext2"]
    assert abs(got / want - 1) < 1e-3, (got, want)


def test_the_next_block_is_read_ahead_in_the_background(tmp_path):
    """While block i is quantized, block i + 1's tensors are read in another thread (disk reads overlap the
    work); each tensor is still read once, and the result is the same as reading each block when it is reached."""
    import threading

    sharded(tmp_path)
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for read_ahead in (True, False):
        lazy = load_skeleton(str(tmp_path), torch.float32)
        if not read_ahead:
            lazy.read_ahead = lambda module: None
        readers, original = {}, lazy.checkpoint.read

        def read(key, original=original, readers=readers):
            readers[key] = threading.current_thread().name
            return original(key)

        lazy.checkpoint.read = read
        ptq.quantize(lazy.model, method="gptq", bits=4, group_size=32, calib=calib, device="cpu", offload=True,
                     lazy=lazy)  # fmt: skip
        runs[read_ahead] = (readers, lazy.model)
    readers = runs[True][0]
    assert {name for key, name in readers.items() if key.startswith("model.layers.1.")} == {"ptq-read-ahead_0"}
    assert all(name == threading.current_thread().name for key, name in readers.items() if "layers" not in key)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(runs[True][1](x).logits, runs[False][1](x).logits)

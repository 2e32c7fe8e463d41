import pytest
import torch

import ptq
from ptq.methods.base import Method
from ptq.models import ModelLoadError, block_linears, get_blocks, get_weight
from ptq.pipeline import run_blocks
from ptq.quant import WeightSpec, quantize_weight
from tests.conftest import tiny_model


def ids(n=3, length=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_method_none_leaves_logits_exactly_unchanged(arch_model):
    x = ids()
    before = arch_model(x).logits
    ptq.quantize(arch_model, method="none", calib=x, device="cpu")
    assert torch.equal(arch_model(x).logits, before)


class RecordInputs(Method):
    """A calibrating step that changes nothing: it records each block's inputs for the test."""

    name = "record"
    needs_calibration = True

    def __init__(self):
        self.seen = []

    def quantize_block(self, ctx):
        self.seen.append(torch.cat([c for c in ctx.inputs.chunks]))
        ctx.forward()


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_pipeline_propagates_the_same_hidden_states_as_the_model(arch_model, batch_size):
    x = ids(n=5)
    reference = arch_model(x, output_hidden_states=True).hidden_states  # embeddings, then each block
    step = RecordInputs()
    run_blocks(arch_model, [step], x, torch.device("cpu"), offload=False, batch_size=batch_size)
    assert len(step.seen) == len(get_blocks(arch_model))
    for i, seen in enumerate(step.seen):
        torch.testing.assert_close(seen, reference[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_each_block_output_is_written_over_its_input_chunk(offload):
    """No second set of calibration activations: block i + 1 reads the very buffers block i read."""

    class RecordBuffers(Method):
        name, needs_calibration = "buffers", True

        def __init__(self):
            super().__init__(WeightSpec("int", 4, -1, False))
            self.pointers = []

        def quantize_block(self, ctx):
            self.pointers.append([chunk.data_ptr() for chunk in ctx.inputs.chunks])

    step = RecordBuffers()
    run_blocks(tiny_model("llama"), [step], ids(n=5), torch.device("cpu"), offload=offload, batch_size=2)
    assert len(step.pointers) > 1 and all(p == step.pointers[0] for p in step.pointers)


def test_pipeline_with_offload_gives_the_same_result():
    x = ids(n=4)
    a, b = tiny_model("llama"), tiny_model("llama")
    sa, sb = RecordInputs(), RecordInputs()
    run_blocks(a, [sa], x, torch.device("cpu"), offload=False, batch_size=3)
    run_blocks(b, [sb], x, torch.device("cpu"), offload=True, batch_size=3)
    for u, v in zip(sa.seen, sb.seen, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_through_the_pipeline_equals_direct_rtn(arch_model, sym):
    spec = WeightSpec("int", 3, 16, sym)
    expected = {
        (i, name): quantize_weight(get_weight(linear).clone(), spec).dequantize()
        for i, block in enumerate(get_blocks(arch_model))
        for name, linear in block_linears(arch_model, block).items()
    }
    embed_before = arch_model.get_input_embeddings().weight.clone()
    ptq.quantize(arch_model, method="rtn", bits=3, group_size=16, sym=sym, device="cpu")
    for i, block in enumerate(get_blocks(arch_model)):
        for name, linear in block_linears(arch_model, block).items():
            assert torch.equal(get_weight(linear), expected[(i, name)]), (i, name)
    # embeddings and lm_head stay in full precision
    assert torch.equal(arch_model.get_input_embeddings().weight, embed_before)


def test_rtn_changes_logits_and_more_bits_change_them_less():
    x = ids()
    base = tiny_model("llama")(x).logits
    errors = {}
    for bits in (3, 8):
        model = tiny_model("llama")
        ptq.quantize(model, method="rtn", bits=bits, group_size=16, device="cpu")
        errors[bits] = (model(x).logits - base).abs().mean().item()
    assert 0 < errors[8] < errors[3]


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'foo'.*rtn"):
        ptq.quantize(tiny_model("llama"), method="foo")


def test_unknown_architecture_is_a_clear_error():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ModelLoadError, match="'mystery' is not in ptq's architecture table.*llama"):
        ptq.quantize(model, method="rtn", device="cpu")


class CaptureLinearInputs(Method):
    """Collects the inputs of every sequential group's first linear, with early-stopping hooks."""

    name = "capture"
    needs_calibration = True

    def __init__(self):
        self.early, self.full = {}, {}

    def quantize_block(self, ctx):
        for group in ctx.sequential:
            reader = {group[0]: ctx.linears[group[0]]}
            ctx.forward_with_input_hooks(reader, lambda n, x: self.early.setdefault((ctx.index, n), []).append(x))
        handles = [
            ctx.linears[g[0]].register_forward_hook(
                lambda _m, args, _o, n=g[0]: self.full.setdefault((ctx.index, n), []).append(args[0])
            )
            for g in ctx.sequential
        ]
        ctx.forward()
        for h in handles:
            h.remove()


def test_early_stopping_input_hooks_see_what_a_full_forward_sees(arch_model):
    step = CaptureLinearInputs()
    run_blocks(arch_model, [step], ids(n=5), torch.device("cpu"), offload=False, batch_size=2)
    assert step.early.keys() == step.full.keys() and len(step.early) == 4 * len(get_blocks(arch_model))
    for key in step.full:
        assert torch.equal(torch.cat(step.early[key]), torch.cat(step.full[key])), key


def residual_model(kind: str) -> torch.nn.Module:
    """A tiny model of each architecture whose table entry describes the residual stream."""
    import transformers as tf

    if kind == "llama":
        return tiny_model("llama")
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    classes = {"mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}  # fmt: skip
    config, model = classes[kind]
    model = model(config(**common))
    model.config.use_cache = False
    return model.eval()


def quantize_recording_shortcuts(monkeypatch, model, shortcuts: bool, **settings) -> tuple[list, list, dict]:
    """GPTQ through ``ptq.quantize``. Returns where a pass continued from what the previous one kept (the
    point it had stopped at, or "output" where the block's outputs were finished from there), each block's
    propagated outputs, and the report. ``shortcuts=False``: as if the architecture table had no block parts."""
    from ptq import pipeline

    propagated = []
    propagate = pipeline.BlockContext.propagate

    def recorded_propagate(ctx):
        outputs = propagate(ctx)
        propagated.append(torch.cat([chunk.cpu() for chunk in outputs.chunks]))
        return outputs

    with monkeypatch.context() as patch:
        events = record_shortcuts(patch)
        patch.setattr(pipeline.BlockContext, "propagate", recorded_propagate)
        if not shortcuts:
            patch.setattr(pipeline, "residual_block", lambda arch: None)
        report = ptq.quantize(model, method="gptq", bits=4, group_size=16, **settings)
    return events, propagated, report


def record_shortcuts(patch) -> list:
    """The list into which each continued pass puts the point it continued from ("output": finishing the
    block's outputs), while ``patch`` (a monkeypatch) lasts."""
    from ptq import block_parts

    events = []
    continued, block_outputs = block_parts.continued, block_parts.block_outputs
    patch.setattr(block_parts, "continued", lambda p, b, kept: events.append(kept.point) or continued(p, b, kept))
    patch.setattr(block_parts, "block_outputs", lambda p, b, kept: events.append("output") or block_outputs(p, b, kept))
    return events


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_gptq_stages_continue_the_block_from_the_last_pass_bit_for_bit(kind, monkeypatch):
    """Each true-sequential pass continues the block from where the previous one stopped, and the next block's
    inputs are finished from the last one (models.residual_block): the same Hessians, losses, weights and
    propagated hidden states, bit for bit, as passes from the block's start."""
    settings = dict(calib=ids(n=5), device="cpu", batch_size=2)
    fast, plain = residual_model(kind), residual_model(kind)
    events, outputs, report = quantize_recording_shortcuts(monkeypatch, fast, shortcuts=True, **settings)
    # per block the MLP's pass continues from the attention's, down_proj's from the MLP's, and the next block's
    # inputs are finished from down_proj's (the last block has no next block)
    assert events == EVERY_SHORTCUT
    none, plain_outputs, plain_report = quantize_recording_shortcuts(monkeypatch, plain, shortcuts=False, **settings)
    assert none == [] and len(outputs) == len(plain_outputs) == 1
    assert torch.equal(outputs[0], plain_outputs[0])
    for block, plain_block in zip(report["blocks"], plain_report["blocks"], strict=True):
        assert block["layers"] == plain_block["layers"]  # losses, damping, token counts
    assert [b["continued_passes"] for b in report["blocks"]] == [3, 2]
    assert [b["continued_passes"] for b in plain_report["blocks"]] == [0, 0]
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


EVERY_SHORTCUT = ["attention", "mlp", "output", "attention", "mlp"]  # of a two-block model


@pytest.mark.parametrize(
    "label,expected",
    [("gptq", EVERY_SHORTCUT), ("gptq then another step", []), ("gptq, one pass per block", []),
     ("gptq, offloaded on the CPU", EVERY_SHORTCUT), ("gptq, a hook on the first block's MLP", EVERY_SHORTCUT[3:])],
)  # fmt: skip
def test_only_a_last_true_sequential_step_keeps_what_a_pass_computed(label, expected, monkeypatch):
    """A step after GPTQ may change the block, one pass for every group precedes every solve, and running parts
    of a block would skip the hooks on its modules: then each pass starts from the block's input. (On the CPU
    the offloaded chunks are on the compute device.)"""
    from ptq.methods.gptq import GPTQ

    spec = WeightSpec("int", 4, 16, False)
    steps = {"gptq then another step": [GPTQ(spec), RecordInputs()],
             "gptq, one pass per block": [GPTQ(spec, true_sequential=False)]}.get(label, [GPTQ(spec)])  # fmt: skip
    model = tiny_model("llama")
    if "hook" in label:
        model.model.layers[0].mlp.register_forward_hook(lambda _module, _inputs, out: out * 2)
    events = record_shortcuts(monkeypatch)
    run_blocks(model, steps, ids(n=4), torch.device("cpu"), offload="offloaded" in label)
    assert events == expected


def test_activations_live_in_host_memory_when_offloading_unless_told():
    from ptq.errors import UserError
    from ptq.pipeline import activation_store

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert activation_store("auto", True, gpu) == cpu and activation_store("auto", False, gpu) == gpu
    assert activation_store("device", True, gpu) == gpu and activation_store("host", False, gpu) == cpu
    with pytest.raises(UserError, match="activations='gpu' is unknown; choose one of auto, host, device"):
        activation_store("gpu", False, gpu)


def test_blocks_with_hooks_are_never_run_in_parts():
    from torch.nn.modules.module import register_module_forward_hook

    from ptq.block_parts import has_hooks

    block = get_blocks(tiny_model("llama"))[0]
    assert not has_hooks(block)
    handle = register_module_forward_hook(lambda _module, _inputs, out: out)  # on every module
    try:
        assert has_hooks(block)
    finally:
        handle.remove()
    block.self_attn.register_forward_pre_hook(lambda _module, args: None)
    assert has_hooks(block)
    other = get_blocks(tiny_model("llama"))[1]
    other.mlp._hf_hook = object()  # accelerate's dispatch
    assert has_hooks(other)

"""ptq's compressed-tensors configs against the scheme selection of vLLM 0.33 (ptq/storage/vllm.py, from its
source: docs/vllm-compressed-tensors.md)."""

import pytest

from ptq.recipe import Recipe
from ptq.storage.compressed_tensors import quantization_config
from ptq.storage.vllm import fast_wna16, vllm_scheme


def config(**settings):
    method = settings.pop("method", "rtn")
    return quantization_config(Recipe.build(method, **settings), ["lm_head"], act_order=False)


@pytest.mark.parametrize(
    "settings,scheme,fast",
    [
        (dict(bits=4, group_size=128, sym=True), "CompressedTensorsWNA16", True),
        (dict(bits=4, group_size=128), "CompressedTensorsWNA16", True),  # 4-bit asymmetric: Marlin has uint4
        (dict(bits=8, group_size=-1, sym=True), "CompressedTensorsWNA16", True),
        (dict(bits=8, group_size=64), "CompressedTensorsWNA16", False),  # 8-bit asymmetric: generic kernel
        (dict(bits=3, group_size=64, sym=True), "CompressedTensorsWNA16", False),
        (dict(bits=4, group_size=16, sym=True), "CompressedTensorsWNA16", False),
        (dict(method="gptq", bits=4, group_size=128, sym=True), "CompressedTensorsWNA16", True),  # actorder static
        (dict(bits=4, group_size=0, sym=True), None, None),  # per-tensor int weights: no WNA16 kernel
        (dict(bits=8, group_size=-1, sym=True, act_bits=8), "CompressedTensorsW8A8Int8", None),
        (
            dict(bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="per_tensor"),
            "CompressedTensorsW8A8Int8",
            None,
        ),  # fmt: skip
        (dict(format="fp8_e4m3", act_format="fp8_e4m3"), "CompressedTensorsW8A8Fp8", None),
        (
            dict(format="fp8_e4m3", group_size=0, act_format="fp8_e4m3", act_granularity="per_tensor"),
            "CompressedTensorsW8A8Fp8",
            None,
        ),  # fmt: skip
        (dict(format="fp8_e4m3"), "CompressedTensorsW8A16Fp8", None),
        (dict(format="fp8_e4m3", group_size=128), None, None),  # FP8 in groups: vLLM has no kernel
        (dict(format="nvfp4"), "CompressedTensorsW4A4Fp4", None),  # use_a16=True
        (dict(format="nvfp4", act_format="nvfp4"), "CompressedTensorsW4A4Fp4", None),
        (dict(format="mxfp4"), "CompressedTensorsW4A4Mxfp4", None),
        (dict(format="mxfp8"), "CompressedTensorsW8A8Mxfp8", None),
    ],
)
def test_what_vllm_would_serve(settings, scheme, fast):
    qc = config(**settings)
    assert vllm_scheme(qc) == scheme
    if fast is not None:
        assert fast_wna16(qc) == fast


def test_refusals_the_rules_see():
    qc = config(bits=4, group_size=128, sym=True)
    group = qc["config_groups"]["group_0"]
    assert vllm_scheme({**qc, "quant_method": "gptq"}) is None
    assert (
        vllm_scheme({**qc, "config_groups": {"g": {**group, "weights": {**group["weights"], "actorder": "group"}}}})
        is None
    )
    fp8_weights_int_acts = config(format="fp8_e4m3", act_format="fp8_e4m3")
    g = fp8_weights_int_acts["config_groups"]["group_0"]
    mixed = {**g, "input_activations": {**g["input_activations"], "type": "int"}}
    assert vllm_scheme({**fp8_weights_int_acts, "config_groups": {"group_0": mixed}}) is None

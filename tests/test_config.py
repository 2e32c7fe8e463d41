import re

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ptq.config import ConfigError, from_dict
from ptq.quant import ActSpec, WeightSpec
from ptq.recipe import Recipe


def composed(*overrides: str) -> dict:
    with initialize_config_module(config_module="ptq.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["output_dir=/tmp/x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_config_is_valid_and_uses_the_quick_profile():
    cfg = from_dict(composed())
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.recipe.method == "rtn"
    assert cfg.recipe.weights == WeightSpec("int", 4, 128, False) and cfg.recipe.activations is None
    assert cfg.calib.nsamples == 32 and cfg.eval.max_windows == 8


def test_paper_profile_is_one_setting_away():
    cfg = from_dict(composed("profile=paper"))
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.eval.max_windows) == (128, 2048, None)


@pytest.mark.parametrize(
    "override,message",
    [
        ("bits=9", "bits=9 is outside 2..8"),
        ("bits=1", "bits=1 is outside 2..8"),
        ("group_size=-2", "group_size=-2 is invalid"),
        ("format=fp4", "format='fp4' is unknown; choose one of int, fp8_e4m3"),
        ("act_format=int4", "act_format='int4' is unknown"),
        ("scheme=nvfp4a16 group_size=128", "format=nvfp4 uses blocks of 16, not group_size=128"),
        ("format=fp8_e4m3 sym=false", "format=fp8_e4m3 is symmetric"),
        ("format=mxfp4 bits=8", "bits=8 does not fit format=mxfp4"),
        ("scheme=fp8 act_granularity=per_block", "act_granularity=per_block does not fit act_format=fp8_e4m3"),
        ("format=nvfp4 act_format=fp8_e4m3", "act_format=fp8_e4m3 needs FP8 weights"),
        ("scheme=w8a8 format=fp8_e4m3", "act_format=int needs integer weights"),
        ("bits=16", "bits=16 is not a quantized format: use method=none"),
        ("device=cuda:x", "device='cuda:x' is unknown"),
        ("calib.nsamples=0", "calib.nsamples=0 must be at least 1"),
        ("calib.activations=gpu", "calib.activations='gpu' is unknown; choose one of auto, host, device"),
        ("device=tpu", "device='tpu' is unknown"),
        ("eval.ppl=[wikitext3]", "eval.ppl has an unknown data set 'wikitext3'"),
        ("model.dtype=float8", "model.dtype='float8' is unknown"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(composed(*override.split()))


@pytest.mark.parametrize(
    "scheme,weights,activations",
    [
        ("w4a16", WeightSpec("int", 4, 128, False), None),
        ("w8a8", WeightSpec("int", 8, -1, True), ActSpec("int", 8, "per_token")),
        ("fp8", WeightSpec("fp8_e4m3", 8, -1, True), ActSpec("fp8_e4m3", 8, "per_token")),
        ("fp8_static", WeightSpec("fp8_e4m3", 8, 0, True), ActSpec("fp8_e4m3", 8, "per_tensor")),
        ("nvfp4", WeightSpec("nvfp4", 4, 16, True), ActSpec("nvfp4", 4, "per_block")),
        ("nvfp4a16", WeightSpec("nvfp4", 4, 16, True), None),
        ("mxfp4", WeightSpec("mxfp4", 4, 32, True), ActSpec("mxfp4", 4, "per_block")),
        ("mxfp4a16", WeightSpec("mxfp4", 4, 32, True), None),
        ("mxfp8", WeightSpec("mxfp8", 8, 32, True), ActSpec("mxfp8", 8, "per_block")),
    ],
)
def test_schemes_build_the_recipe_once(scheme, weights, activations):
    recipe = from_dict(composed(f"scheme={scheme}", "method=gptq")).recipe
    assert recipe.weights == weights and recipe.activations == activations
    assert recipe == Recipe.build("gptq", weights.format, weights.bits, weights.group_size, weights.sym,
                                  *((activations.format, activations.bits, activations.granularity) if activations
                                    else ()), options=recipe.options)  # fmt: skip


def test_format_alone_takes_its_defaults_and_full_precision_ignores_weight_settings():
    assert from_dict(composed("format=fp8_e5m2")).recipe.weights == WeightSpec("fp8_e5m2", 8, -1, True)
    assert from_dict(composed("act_bits=8", "bits=8", "group_size=-1", "sym=true")).recipe.activations == ActSpec()
    recipe = from_dict(composed("method=none", "format=nvfp4")).recipe
    assert recipe.full_precision and recipe.weights is None
    record_fields = from_dict(composed("scheme=nvfp4")).to_dict()
    assert (record_fields["format"], record_fields["act_format"], record_fields["bits"]) == ("nvfp4", "nvfp4", 4)


def test_gptq_defaults_to_activation_order_with_static_groups_and_keeps_the_reference_order():
    default = from_dict(composed("method=gptq")).recipe.options["gptq"]
    assert default["act_order"] is True and default["static_groups"] is True
    reference = from_dict(composed("method=gptq-reference")).recipe
    assert reference.method == "gptq" and reference.options["gptq"]["act_order"] is False
    assert reference.options["gptq"]["static_groups"] is False


def test_unknown_method_lists_the_valid_ones():
    d = composed()
    d["method"] = {"name": "fancy"}
    valid = "none, aqlm, awq, gptq, quarot, rtn, smoothquant, spqr"
    with pytest.raises(ConfigError, match=f"unknown method 'fancy'.*{valid}"):
        from_dict(d)


def test_unknown_calibration_set_lists_the_valid_ones():
    d = composed()
    d["calib"]["name"] = "books"
    with pytest.raises(ConfigError, match="calib='books' is unknown.*wikitext2"):
        from_dict(d)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [("model=custom", "model.path is not set: model=custom needs model.path=<folder"),
     ("calib=file", "calib.path is not set: calib=file needs calib.path=")],
)  # fmt: skip
def test_a_setting_a_preset_leaves_open_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(composed(overrides))

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ptq.config import ConfigError, from_dict


def composed(*overrides: str) -> dict:
    with initialize_config_module(config_module="ptq.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["output_dir=/tmp/x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_config_is_valid_and_uses_the_quick_profile():
    cfg = from_dict(composed())
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.method == "rtn"
    assert (cfg.bits, cfg.group_size, cfg.sym) == (4, 128, False)
    assert cfg.calib.nsamples == 32 and cfg.eval.max_windows == 8


def test_paper_profile_is_one_setting_away():
    cfg = from_dict(composed("profile=paper"))
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.eval.max_windows) == (128, 2048, None)


@pytest.mark.parametrize(
    "override,message",
    [
        ("bits=9", "bits=9 is outside 2..8"),
        ("bits=1", "bits=1 is outside 2..8"),
        ("group_size=0", "group_size=0 is invalid"),
        ("group_size=-2", "group_size=-2 is invalid"),
        ("calib.nsamples=0", "calib.nsamples=0 must be at least 1"),
        ("device=tpu", "device='tpu' is unknown"),
        ("eval.ppl=[wikitext3]", "eval.ppl has unknown data sets"),
        ("model.dtype=float8", "model.dtype='float8' is unknown"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(composed(override))


def test_bits_16_means_full_precision():
    assert from_dict(composed("bits=16")).full_precision


def test_unknown_method_lists_the_valid_ones():
    d = composed()
    d["method"] = {"name": "fancy"}
    with pytest.raises(ConfigError, match="unknown method 'fancy'.*none, awq, gptq, rtn, smoothquant"):
        from_dict(d)


def test_unknown_calibration_set_lists_the_valid_ones():
    d = composed()
    d["calib"]["name"] = "books"
    with pytest.raises(ConfigError, match="calib='books' is unknown.*wikitext2"):
        from_dict(d)

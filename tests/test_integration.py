"""Real models from the assets folder (PTQ_ASSETS, default ../shared/assets). CI always has them."""

import pytest
import torch

import ptq
from ptq import data, models
from ptq.data import EVAL_SETS
from ptq.eval.perplexity import perplexity
from tests.conftest import require_assets

CPU = torch.device("cpu")


def load(preset_dir: str, gguf: str | None = None):
    root = require_assets(preset_dir, "data/wikitext-2-raw-v1/test.jsonl", "data/wikitext-2/valid.tokens.txt")
    source = models.ModelSource(str(root / preset_dir), gguf, "assets")
    return models.load_model(source, torch.float32), models.load_tokenizer(source), root


@pytest.fixture(scope="module")
def stories():
    model, tokenizer, root = load("models/stories260K")
    ids = data.tokenize(tokenizer, data.load_text("wikitext2", EVAL_SETS, root).joined)
    windows = data.eval_windows(ids, 512, 40)
    calib = data.load_calibration(tokenizer, "wikitext2_valid", None, 64, 512, 0, root)
    return model, windows, calib.input_ids


def _ppl_after(stories, method, bits, group_size=64, **kw):
    model, windows, calib = stories
    model = type(model)(model.config)
    model.load_state_dict(stories[0].state_dict())
    model.eval()
    ptq.quantize(model, method=method, bits=bits, group_size=group_size, calib=calib, device="cpu", **kw)
    return perplexity(model, windows, CPU, batch_size=8)


def test_stories260k_full_precision_matches_the_reference_figure(stories):
    model, windows, _ = stories
    assert perplexity(model, windows, CPU, batch_size=8) == pytest.approx(131, abs=2)  # assets README


def test_stories260k_rtn_and_gptq(stories):
    fp = perplexity(stories[0], stories[1], CPU, batch_size=8)
    rtn4, rtn3 = _ppl_after(stories, "rtn", 4), _ppl_after(stories, "rtn", 3)
    gptq3 = _ppl_after(stories, "gptq", 3)
    assert fp < rtn4 < rtn3
    assert gptq3 < rtn3


def test_offloaded_evaluation_equals_resident_evaluation(stories):
    model, windows, _ = stories
    resident = perplexity(model, windows[:4], CPU, batch_size=2)
    offloaded = perplexity(model, windows[:4], CPU, offload=True, batch_size=2)
    assert offloaded == pytest.approx(resident, rel=1e-5)


def test_smollm2_gguf_loads_and_quantizes_with_a_partial_group():
    model, tokenizer, root = load("models/smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model.config.hidden_size == 576  # 576 = 4 x 128 + 64: group 128 leaves a partial group
    ids = data.tokenize(tokenizer, data.load_text("wikitext2", EVAL_SETS, root).joined)
    windows = data.eval_windows(ids, 256, 2)
    fp = perplexity(model, windows, CPU)
    ptq.quantize(model, method="rtn", bits=4, group_size=128, device="cpu")
    q = perplexity(model, windows, CPU)
    assert 5 < fp < 60 and fp < q < 3 * fp

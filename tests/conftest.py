import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from ptq.config import REPO_ROOT

# Runs started by the tests (in-process or as subprocesses) cache in a fresh folder, never in the user's.
os.environ["PTQ_CACHE"] = tempfile.mkdtemp(prefix="ptq-test-cache-")

ASSETS = Path(os.environ.get("PTQ_ASSETS") or REPO_ROOT.parent / "shared" / "assets")


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of each supported layout, small enough for unit tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=48, intermediate_size=80, num_key_value_heads=2, max_position_embeddings=128, **common
        )
        model = LlamaForCausalLM(config)
    elif kind == "opt":
        config = OPTConfig(hidden_size=48, ffn_dim=80, word_embed_proj_dim=48, max_position_embeddings=128, **common)
        model = OPTForCausalLM(config)
    elif kind == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=48, intermediate_size=80, max_position_embeddings=128, **common)
        model = GPTNeoXForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, vocab_size=96)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    model.config.use_cache = False
    return model.eval()


ARCHS = ["llama", "opt", "gpt_neox", "gpt2"]


@pytest.fixture(params=ARCHS)
def arch_model(request):
    return tiny_model(request.param)


def require_assets(*relative: str) -> Path:
    """Skip (with the reason) only when the assets are absent; CI always has them."""
    for rel in relative:
        if not (ASSETS / rel).exists():
            if os.environ.get("CI"):
                pytest.fail(f"CI must have the assets: {ASSETS / rel} is missing (set PTQ_ASSETS)")
            pytest.skip(f"assets not found: {ASSETS / rel} (set PTQ_ASSETS to the assets folder)")
    return ASSETS

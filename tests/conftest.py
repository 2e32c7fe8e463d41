import os
import subprocess
import sys
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


MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def tiny_moe(kind: str, seed: int = 0, vocab_size: int = 96, experts: int = 4) -> torch.nn.Module:
    """A randomly initialised mixture-of-experts model (transformers' fused expert parameters) with a
    handful of experts, two blocks; the first is dense where the architecture allows dense layers."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=2)  # fmt: skip
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=48, num_local_experts=experts, **common))
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                   num_experts=experts, mlp_only_layers=[0], **common)  # fmt: skip
        model = tf.Qwen2MoeForCausalLM(config)
    elif kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=experts, head_dim=8,
                                   **common)  # fmt: skip
        model = tf.Qwen3MoeForCausalLM(config)
    elif kind == "deepseek_v3":
        config = tf.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=experts, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, **{**common, "num_key_value_heads": 4},
        )  # fmt: skip
        model = tf.DeepseekV3ForCausalLM(config)
    elif kind == "gpt_oss":
        config = tf.GptOssConfig(intermediate_size=24, num_local_experts=experts, head_dim=8,
                                 layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default",
                                 "rope_theta": 10000.0}, **common)  # fmt: skip
        model = tf.GptOssForCausalLM(config)
    else:
        raise ValueError(kind)
    for param in model.parameters():  # fused expert parameters start empty (torch.empty): give them values
        if param.dim() == 3:
            torch.nn.init.normal_(param, std=0.05)
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


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


def run_interpreted(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python *args`` in a child process with Triton's interpreter on (it is chosen when kernels are defined, so
    this process, which defined them for the CPU or GPU, cannot switch); the child must succeed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done

"""Model loading and the one table of architecture knowledge.

Every method asks this module, never the model class, where the decoder blocks are, which modules
run before block 0, and in which order a block's linears see their inputs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ptq import hub
from ptq.errors import UserError

log = logging.getLogger(__name__)


class ModelLoadError(UserError):
    """A model could not be found or loaded; the message names the fix."""


@dataclass(frozen=True)
class ScaleGroup:
    """Linears whose input channels can be rescaled without changing the block's function (AWQ,
    SmoothQuant): ``prev`` produces their input, so x/s is folded into ``prev`` and s into their
    weight columns. ``prev`` is a norm (weight and bias scaled), a linear (output rows scaled) or an
    activation module (wrapped to divide by s). ``inspect`` is the module whose output AWQ compares
    (it contains the linears, and its input is theirs)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    # Modules that read the same input but are never quantized (a MoE block's router): their input
    # columns are scaled with the linears' so that the block's function is kept.
    also_scaled: tuple[str, ...] = ()
    reader: str | None = None  # whose input stands for the group's (default: the first linear's)


@dataclass(frozen=True)
class ResidualStream:
    """What rotating the residual stream touches (QuaRot, Sec. 4): the embedding and the block linears
    that write the stream (rotated on their output side), the RMSNorms and the linears that read it
    (norm scales fused into the readers, which are rotated on their input side), the final norm and the
    head; and inside a block, the value/output projections (a per-head rotation between them) and the
    MLP's output projection (an online rotation of its input)."""

    embedding: str
    final_norm: str
    head: str
    readers: tuple[tuple[str, tuple[str, ...]], ...]  # per block: (norm, the linears it feeds)
    writers: tuple[str, ...]  # per block: linears whose output is added to the stream
    value: str
    attention_out: str
    mlp_out: str


@dataclass(frozen=True)
class Experts:
    """A block's routed experts, which transformers stores fused: every expert's matrices in one 3-D
    ``gate_up_proj`` and one ``down_proj`` parameter (``ptq.moe`` unfuses them while the block is
    quantized). ``layout``: ``gate_up`` ([E, 2I, H], gate rows then up rows; down [E, H, I]: nn.Linear's
    [out, in]) or ``gpt_oss`` ([E, H, 2I] multiplied as x @ W, gate and up interleaved in the columns;
    down [E, I, H]; with biases and a clamped SwiGLU). ``router``: never quantized. ``shared``: an
    ordinary MLP (gate_proj, up_proj, down_proj) beside the routed experts, where the model has one."""

    path: str
    router: str
    layout: str = "gate_up"
    shared: str | None = None
    shared_gate: str | None = None  # Qwen2-MoE's sigmoid gate on the shared expert (a linear; never quantized)
    norm: str = "post_attention_layernorm"  # what feeds the router and the experts
    block: str = "mlp"  # the MoE module: router, experts and shared expert inside
    # How a saved checkpoint names what transformers renames on loading (regex, replacement), applied to
    # the model's names: Mixtral's Hub layout is block_sparse_moe.experts.<e>.w1 (gate), w3 (up), w2 (down).
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def members(self, block: nn.Module, count: int) -> list[str]:
        """The MLPs of a MoE block, by path: its ``count`` routed experts (unfused), and the shared one."""
        members = [f"{self.path}.{e}" for e in range(count)]
        if self.shared and get_submodule(block, self.shared) is not None:
            members.append(self.shared)
        return members

    def checkpoint_name(self, key: str) -> str:
        for pattern, replacement in self.checkpoint_names:
            key = re.sub(pattern, replacement, key)
        return key


@dataclass(frozen=True)
class GatedMlp:
    """A block's MLP that computes down(act(gate(x)) * up(x)) (a GLU variant; SwiGLU where the config's
    ``hidden_act`` is SiLU), by path."""

    module: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Arch:
    """Where things are in one model family (paths are dotted attribute names)."""

    layers: str  # the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules that run before block 0 (needed to capture its inputs)
    head: tuple[str, ...]  # modules that run after the last block, in order (final norm, lm_head)
    # Linears of one block grouped by the input they read, in the order the data flows through the
    # block (GPTQ's true-sequential order): attention-in, attention-out, MLP-in, MLP-out.
    sequential: tuple[tuple[str, ...], ...]
    # Scaling groups in data-flow order (AWQ, SmoothQuant); empty where none are known. A group whose
    # ``prev`` is a linear applies only when its output size matches (e.g. not v -> o under GQA).
    scaling: tuple[ScaleGroup, ...] = ()
    no_clip: tuple[str, ...] = ()  # linears AWQ does not clip (q/k: the reference skips them)
    residual: ResidualStream | None = None  # for rotations (QuaRot); None where not described
    attention: str | None = None  # a block's attention module (KV-cache quantization); None where not described
    # Mixture-of-experts models: the routed experts of a MoE block. Their blocks differ (dense layers
    # beside MoE ones, optional projections), so names in ``sequential`` a block lacks are skipped.
    experts: Experts | None = None
    gated_mlp: GatedMlp | None = None  # where the dense MLP is down(act(gate(x)) * up(x)); None elsewhere


_LLAMA_LIKE = Arch(
    layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    head=("model.norm", "lm_head"),
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scaling=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    residual=ResidualStream(
        embedding="model.embed_tokens",
        final_norm="model.norm",
        head="lm_head",
        readers=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        value="self_attn.v_proj",
        attention_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
    ),
    attention="self_attn",
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    gated_mlp=GatedMlp("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

_LLAMA_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_DENSE_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # the dense layers of MoE models
_ATTENTION_SCALING = _LLAMA_LIKE.scaling[:2]


def _moe(sequential: tuple, experts: Experts, scaling: tuple = _ATTENTION_SCALING, attention: str | None = "self_attn"):
    return Arch(
        layers="model.layers", embeddings=("model.embed_tokens", "model.rotary_emb"), head=("model.norm", "lm_head"),
        sequential=sequential, scaling=scaling, no_clip=("self_attn.q_proj", "self_attn.k_proj"), attention=attention,
        experts=experts,
    )  # fmt: skip


# DeepSeek's multi-head latent attention: q (or its low-rank pair q_a -> q_b) and the compressed kv read the
# block's input; q_b and kv_b read their own normalized projections.
_MLA = (
    ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.q_b_proj",),
    ("self_attn.kv_b_proj",),
    ("self_attn.o_proj",),
)

_MIXTRAL = Experts(
    "mlp.experts",
    "mlp.gate",
    checkpoint_names=(
        (r"\.mlp\.", ".block_sparse_moe."),
        (r"\.experts\.(\d+)\.gate_proj\b", r".experts.\1.w1"),
        (r"\.experts\.(\d+)\.up_proj\b", r".experts.\1.w3"),
        (r"\.experts\.(\d+)\.down_proj\b", r".experts.\1.w2"),
    ),
)
_QWEN2_MOE = Experts("mlp.experts", "mlp.gate", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")
_DEEPSEEK = _moe((*_MLA, *_DENSE_MLP), Experts("mlp.experts", "mlp.gate", shared="mlp.shared_experts"), (), None)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": Arch(
        layers="model.decoder.layers",
        embeddings=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        scaling=(  # pre-norm OPT only (do_layer_norm_before); see scale_groups()
            ScaleGroup(
                "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
            ),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU between them commutes with a positive scale
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
        head=("gpt_neox.final_layer_norm", "embed_out"),
        sequential=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        # q/k/v are one fused linear, so v cannot be rescaled alone: no attention-out group.
        scaling=(
            ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
            ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
            ScaleGroup("mlp.act", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),  # GELU: wrapped, see ScaledActivation
        ),
        no_clip=("attention.query_key_value",),
    ),
    "mixtral": _moe(_LLAMA_ATTENTION, _MIXTRAL),
    "qwen2_moe": _moe((*_LLAMA_ATTENTION, *_DENSE_MLP), _QWEN2_MOE),
    "qwen3_moe": _moe((*_LLAMA_ATTENTION, *_DENSE_MLP), Experts("mlp.experts", "mlp.gate")),
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "gpt_oss": _moe(_LLAMA_ATTENTION, Experts("mlp.experts", "mlp.router", layout="gpt_oss"), attention=None),
    "gpt2": Arch(
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        head=("transformer.ln_f", "lm_head"),
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
}


def arch_for(model_type: str | None) -> Arch:
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {model_type!r} is not in ptq's architecture table; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add one entry to ARCHITECTURES in ptq/models.py."
        )
    return ARCHITECTURES[model_type]


def get_arch(model: nn.Module) -> Arch:
    return arch_for(getattr(getattr(model, "config", None), "model_type", None))


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def scale_groups(config) -> tuple[ScaleGroup, ...]:
    """The scaling groups of a model's blocks, from its HF config; an error if the table has none
    (a MoE block's expert groups are added per block: ``block_scale_groups``)."""
    arch = arch_for(config.model_type)
    if not arch.scaling and arch.experts is None:
        raise ModelLoadError(
            f"architecture {config.model_type!r} has no scaling groups (needed by AWQ and SmoothQuant); "
            f"supported: {', '.join(sorted(k for k, a in ARCHITECTURES.items() if a.scaling or a.experts))}. "
            "Add `scaling=` to its entry in ARCHITECTURES (ptq/models.py), or use method=rtn or gptq."
        )
    if config.model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise ModelLoadError(
            "this OPT model normalizes after attention (do_layer_norm_before=False, e.g. OPT-350M), so its "
            "layer norms do not feed the linears and scales cannot be folded into them; use method=rtn or gptq"
        )
    return arch.scaling


def block_scale_groups(arch: Arch, block: nn.Module) -> tuple[ScaleGroup, ...]:
    """The scaling groups of one block. A MoE block (its experts unfused, ``ptq.moe``) adds: the norm
    before it -> every expert's gate and up and the shared expert's (the router scaled alongside, never
    quantized), and each expert's up -> down (SwiGLU experts: act(gate) * up commutes with a scale on up;
    gpt-oss clamps up and adds 1, so its experts have none)."""
    if arch.experts is None:
        return arch.scaling
    groups = [g for g in arch.scaling if all(get_submodule(block, m) is not None for m in (g.prev, *g.linears))]
    x = arch.experts
    experts = get_submodule(block, x.path)
    if not isinstance(experts, nn.ModuleList):
        return tuple(groups)
    members = x.members(block, len(experts))
    readers = tuple(m for m in (x.router, x.shared_gate) if m and get_submodule(block, m) is not None)
    into = tuple(f"{m}.{proj}" for m in members for proj in ("gate_proj", "up_proj"))
    groups.append(ScaleGroup(x.norm, into, x.block, also_scaled=readers, reader=x.router))
    if x.layout == "gate_up":
        groups += [ScaleGroup(f"{m}.up_proj", (f"{m}.down_proj",), f"{m}.down_proj") for m in members]
    return tuple(groups)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    arch = get_arch(model)
    blocks = get_submodule(model, arch.layers)
    if not isinstance(blocks, nn.ModuleList):
        raise ModelLoadError(f"{type(model).__name__} has no decoder blocks at {arch.layers!r}")
    return blocks


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    found = (get_submodule(model, path) for path in get_arch(model).embeddings)
    return [m for m in found if m is not None]


def head_modules(model: nn.Module) -> list[nn.Module]:
    found = (get_submodule(model, path) for path in get_arch(model).head)
    return [m for m in found if m is not None]


def is_tied_head(config, key: str) -> bool:
    """Whether parameter ``key`` is an LM head that transformers ties to the input embeddings (stored
    once, under the embeddings' name)."""
    return key.endswith("lm_head.weight") and bool(getattr(config, "tie_word_embeddings", False))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


Stages = tuple[tuple[tuple[str, ...], ...], ...]


@dataclass(frozen=True)
class ResidualBlock:
    """A pre-norm residual block in the parts between its linears, as the residual stream of the architecture
    table describes it: for block input x, ``h = x + attention_out(a)`` (a: the attention's output before its
    output projection), ``y = mlp_norm(h)``, the module ``mlp`` maps y to ``mlp_out``'s input d, and the block's
    output is ``h + mlp_out(d)``. ``mlp_in``: the first linear reading y. With these a block can be run from
    the middle (``ptq.block_parts``)."""

    attention_out: str
    mlp_norm: str
    mlp: str
    mlp_in: str
    mlp_out: str


def residual_block(arch: Arch) -> ResidualBlock | None:
    """The parts of the architecture's blocks; None where the table does not describe the residual stream, or
    the MLP is a mixture of experts."""
    if arch.residual is None or arch.experts is not None:
        return None
    stream = arch.residual
    mlp_norm, mlp_readers = stream.readers[-1]
    mlp = mlp_readers[0].rsplit(".", 1)[0]
    return ResidualBlock(stream.attention_out, mlp_norm, mlp, mlp_readers[0], stream.mlp_out)


def block_layout(model: nn.Module, block: nn.Module) -> tuple[dict[str, nn.Module], Stages]:
    """The quantizable linears of one block, by name in true-sequential order, and their stages: groups
    of linears that read the same input, and the groups whose inputs one forward pass yields together
    (one group per stage in a dense block; every expert's gate/up, then every expert's down, in a MoE
    block whose experts ``ptq.moe.unfuse`` has split into linears)."""
    arch = get_arch(model)
    linears, stages = {}, []
    for group in arch.sequential:
        present = []
        for name in group:
            module = get_submodule(block, name)
            if module is None and arch.experts is not None:
                continue  # a MoE model's layers differ (dense vs MoE MLP, optional projections)
            if module is None or not is_linear(module):
                raise ModelLoadError(f"expected a linear layer at {name!r} in {type(block).__name__}")
            linears[name] = module
            present.append(name)
        if present:
            stages.append((tuple(present),))
    experts = get_submodule(block, arch.experts.path) if arch.experts else None
    if isinstance(experts, nn.ModuleList):  # unfused: one linear per matrix of every expert
        from ptq.moe import expert_stages

        for stage in expert_stages(arch.experts, block, len(experts)):
            for group in stage:
                linears.update((name, get_submodule(block, name)) for name in group)
            stages.append(stage)
    return linears, tuple(stages)


def block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linears of one block, by name, in true-sequential order (``block_layout``)."""
    return block_layout(model, block)[0]


def get_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever the module stores."""
    return linear.weight.data.t() if type(linear).__name__ == "Conv1D" else linear.weight.data


def set_weight(linear: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out_features, in_features] weight back in the module's own layout and dtype."""
    target = linear.weight.data
    target.copy_(weight.t() if type(linear).__name__ == "Conv1D" else weight)


def head_dim_of(config) -> int:
    """Features per attention head (configs state it, or it is hidden_size / num_attention_heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_context_of(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, after resolving presets against the assets folder."""

    path: str  # local directory or hub id
    gguf_file: str | None
    origin: str  # "local" | "assets" | "hub"


def resolve_source(
    path: str | None,
    gguf_file: str | None,
    hub_id: str | None,
    assets_dir: str | None,
    assets_gguf_file: str | None,
    assets_root: Path,
) -> ModelSource:
    """An explicit ``model.path`` wins; else the preset's copy in the assets folder; else the hub."""
    if path:
        return ModelSource(path, gguf_file, "local" if Path(path).exists() else "hub")
    if assets_dir and (assets_root / assets_dir).is_dir():
        return ModelSource(str(assets_root / assets_dir), assets_gguf_file, "assets")
    if hub_id:
        return ModelSource(hub_id, None, "hub")
    raise ModelLoadError(
        f"this model preset has no hub id and its assets copy {assets_dir!r} is not under "
        f"{assets_root}; set paths.assets (or PTQ_ASSETS) to the assets folder, or model.path=<dir>"
    )


def check_source(source: ModelSource) -> None:
    """Cheap checks that fail before any heavy work: missing files, missing gguf package."""
    if source.gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a GGUF file needs the 'gguf' package: pip install gguf")
        if source.origin != "hub" and not (Path(source.path) / source.gguf_file).is_file():
            raise ModelLoadError(f"model.gguf_file={source.gguf_file!r} is not in {source.path}")
    if source.origin == "local" and Path(source.path).is_file() and source.path.endswith(".gguf"):
        folder, name = Path(source.path).parent, Path(source.path).name
        raise ModelLoadError(
            f"model.path={source.path!r} is a GGUF file: give its folder and the file apart, "
            f"model.path={folder} model.gguf_file={name}"
        )
    if source.origin == "local" and not (Path(source.path) / "config.json").is_file() and not source.gguf_file:
        raise ModelLoadError(f"model.path={source.path!r} has no config.json (not a Hugging Face model folder)")
    looks_local = source.path.startswith(("/", ".", "~")) or os.sep + os.sep in source.path
    if source.origin == "hub" and looks_local:
        raise ModelLoadError(f"model.path={source.path!r} does not exist")


def _hub_hint(what: str) -> str:
    return (
        f"could not reach the Hugging Face Hub for {what}. Offline, point at local files: "
        "model.path=<folder with config.json and weights> (plus model.gguf_file=<file> for GGUF), "
        "or a preset whose copy is in the assets folder (paths.assets / PTQ_ASSETS)"
    )


def _from_pretrained(loader, source: ModelSource, what: str, **kwargs):
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.origin == "hub" and not hub.reachable():
        kwargs["local_files_only"] = True  # the Hub's cache only: no half minute of retries
    try:
        return loader.from_pretrained(source.path, **kwargs)
    except OSError as err:
        if source.origin == "hub":
            first_line = str(err).splitlines()[0]
            raise ModelLoadError(f"{_hub_hint(source.path)} ({err.__class__.__name__}: {first_line})") from err
        raise ModelLoadError(f"could not load the {what} from {source.path}: {err}") from err
    except Exception as err:
        corrupt_gguf = source.gguf_file and isinstance(err, (ValueError, KeyError, IndexError, struct.error))
        if type(err).__name__ != "SafetensorError" and not corrupt_gguf:
            raise
        # A weight file that cannot be parsed (cut short by a failed download or copy, or not what it claims).
        where = f"{source.path}/{source.gguf_file}" if source.gguf_file else source.path
        raise ModelLoadError(
            f"could not read the {what} from {where} ({err.__class__.__name__}: {str(err)[:200]}): the file is "
            "incomplete or corrupt; copy or download it again"
        ) from err


def load_config(source: ModelSource):
    """The model's config only (cheap): enough to check the architecture and context up front."""
    from transformers import AutoConfig

    check_source(source)
    config = _from_pretrained(AutoConfig, source, "config")
    arch_for(config.model_type)
    return config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, "tokenizer")


def load_model(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    """Load a causal LM on the CPU, in eval mode with the KV cache disabled."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=dtype)
    model.eval()
    model.config.use_cache = False
    get_arch(model)
    return model

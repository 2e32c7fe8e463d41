"""Which vLLM scheme would serve a compressed-tensors ``quantization_config``: the rules of vLLM 0.33's
``compressed_tensors.py`` (``_get_scheme_from_parts``), read from its source and summarized in
docs/vllm-compressed-tensors.md. A prediction from the config alone, not a run of vLLM."""

from __future__ import annotations

FAST_WNA16_GROUPS = (None, 32, 64, 128)  # Marlin/Machete; other sizes go to a generic kernel


def vllm_scheme(qc: dict) -> str | None:
    """The scheme class vLLM 0.33 picks for every config group (one answer when all agree), or None when
    it would refuse the checkpoint."""
    if qc.get("quant_method") != "compressed-tensors" or qc.get("sparsity_config"):
        return None
    schemes = {_group_scheme(g, g.get("format") or qc.get("format")) for g in qc["config_groups"].values()}
    return schemes.pop() if len(schemes) == 1 else None


def _group_scheme(group: dict, fmt: str | None) -> str | None:
    w, a = group["weights"], group.get("input_activations")
    if w.get("actorder") not in (None, "static", "weight") or w.get("dynamic"):
        return None
    strategy, bits, sym = w.get("strategy"), w["num_bits"], w["symmetric"]
    if w["type"] == "float":
        if bits == 4 and strategy == "tensor_group" and w.get("group_size") == 16 and sym:
            return "CompressedTensorsW4A4Fp4" if a is None or (a["type"] == "float" and a["num_bits"] == 4) else None
        if bits == 4 and strategy == "group" and w.get("group_size") == 32 and sym:
            return "CompressedTensorsW4A4Mxfp4"
        if bits == 8 and strategy == "group" and w.get("group_size") == 32 and sym:
            return "CompressedTensorsW8A8Mxfp8" if w.get("scale_dtype") == "torch.uint8" else None
        if bits != 8 or not sym or strategy not in ("tensor", "channel", "block"):
            return None
        if fmt not in ("float-quantized", "naive-quantized"):
            return None
        if a is None:
            return "CompressedTensorsW8A16Fp8"
        if a["type"] == "float" and a["num_bits"] == 8 and (a.get("dynamic") or a.get("strategy") == "tensor"):
            return "CompressedTensorsW8A8Fp8"
        return None
    if a is None:
        if fmt == "pack-quantized" and strategy in ("group", "channel") and 2 <= bits <= 8:
            return "CompressedTensorsWNA16"
        return None
    if fmt not in ("int-quantized", "naive-quantized") or a["type"] != "int" or (bits, a["num_bits"]) != (8, 8):
        return None
    if not sym or strategy not in ("channel", "tensor"):
        return None
    dynamic_token = a.get("strategy") == "token" and a.get("dynamic")
    static_tensor = a.get("strategy") == "tensor" and not a.get("dynamic")
    return "CompressedTensorsW8A8Int8" if dynamic_token or static_tensor else None


def fast_wna16(qc: dict) -> bool:
    """Whether a WNA16 checkpoint gets vLLM's mature kernels (Marlin/Machete) rather than a generic one:
    4 or 8 bits, symmetric (or 4-bit asymmetric), per channel or groups of 32, 64 or 128."""
    w = next(iter(qc["config_groups"].values()))["weights"]
    return (
        w["num_bits"] in (4, 8) and (w["symmetric"] or w["num_bits"] == 4) and w.get("group_size") in FAST_WNA16_GROUPS
    )

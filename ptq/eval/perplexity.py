"""GPTQ-protocol perplexity: the text tokenized once, cut into non-overlapping windows, exp(mean NLL).

Each window is scored independently (no context carried over), the loss of a window is the mean
next-token NLL over its seqlen - 1 predictions, and perplexity is exp of the mean over windows, as
in IST-DASLab/gptq's ``*_eval`` functions. Log-softmax is computed in fp32.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ptq.bars import Bar
from ptq.pipeline import blockwise_logits

log = logging.getLogger(__name__)


def _token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every prediction: [n, seqlen - 1], fp32."""
    shift_logits = logits[:, :-1, :].float()
    targets = windows[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def token_nll(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    offload: bool = False,
    batch_size: int = 1,
    lazy=None,
) -> torch.Tensor:
    """NLL of every next-token prediction of ``model`` over ``windows`` [n, seqlen]: [n, seqlen - 1] on
    the CPU. With ``offload`` the model is run one block at a time on ``device`` (it stays in host
    memory); otherwise it is moved to ``device``."""
    losses = []
    if offload:
        chunks = windows.split(batch_size)
        for batch, logits in zip(chunks, blockwise_logits(model, windows, device, batch_size, lazy), strict=True):
            losses.append(_token_nll(logits, batch).cpu())
    else:
        model.to(device)
        with Bar(windows.shape[0], "perplexity", "window", quarters=True) as bar:
            for batch in windows.split(batch_size):
                logits = model(input_ids=batch.to(device), use_cache=False).logits
                losses.append(_token_nll(logits, batch).cpu())
                bar.step(batch.shape[0])
    return torch.cat(losses)


def perplexity_of(nll: torch.Tensor) -> float:
    """exp of the mean over windows of each window's mean NLL (``token_nll``'s output)."""
    return math.exp(nll.mean(dim=1).double().mean().item())


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, offload: bool = False,
               batch_size: int = 1, lazy=None) -> float:  # fmt: skip
    """Perplexity of ``model`` over ``windows`` [n, seqlen]."""
    return perplexity_of(token_nll(model, windows, device, offload, batch_size, lazy))


POSITION_BUCKETS = 32


def per_example(nll: torch.Tensor, windows: torch.Tensor, tokenizer=None) -> dict:
    """What ``eval.per_example`` records for one text: each window's mean NLL, where it starts in the
    text and how it begins (its first tokens decoded), and the mean NLL by position in the window, in
    ``POSITION_BUCKETS`` buckets (does the loss depend on how much context a token has?)."""
    positions = nll.shape[1]
    bucket = max(1, -(-positions // POSITION_BUCKETS))
    padded = F.pad(nll.mean(dim=0), (0, -positions % bucket), value=float("nan"))
    by_position = padded.reshape(-1, bucket).nanmean(dim=1)
    record = {
        "window_nll": nll.mean(dim=1).tolist(),
        "window_start": [i * windows.shape[1] for i in range(windows.shape[0])],
        "position_bucket": bucket,
        "position_nll": by_position.tolist(),
    }
    if tokenizer is not None:
        record["window_text"] = [tokenizer.decode(w[:24]).replace("\n", " ")[:100] for w in windows]
    return record

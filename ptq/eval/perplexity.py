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

from ptq.pipeline import blockwise_logits

log = logging.getLogger(__name__)


def _window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window: [n]."""
    shift_logits = logits[:, :-1, :].float()
    targets = windows[:, 1:].to(logits.device)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), targets, reduction="none")
    return nll.mean(dim=1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    offload: bool = False,
    batch_size: int = 1,
    lazy=None,
) -> float:
    """Perplexity of ``model`` over ``windows`` [n, seqlen]. With ``offload`` the model is run one
    block at a time on ``device`` (it stays in host memory); otherwise it is moved to ``device``."""
    losses = []
    if offload:
        chunks = windows.split(batch_size)
        for batch, logits in zip(chunks, blockwise_logits(model, windows, device, batch_size, lazy), strict=True):
            losses.append(_window_nll(logits, batch).cpu())
    else:
        model.to(device)
        for i, batch in enumerate(windows.split(batch_size)):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            losses.append(_window_nll(logits, batch).cpu())
            log.debug("window batch %d: nll %.4f", i, losses[-1].mean().item())
    mean_nll = torch.cat(losses).double().mean().item()
    return math.exp(mean_nll)

"""Whether the Hugging Face Hub can be reached, asked once per process.

Offline, transformers and datasets retry each request for about half a minute before they fall back to
their local caches or fail. ptq asks once (a short request) and, when the Hub cannot be reached, lets
them look in their caches only (``local_files_only``, ``offline``): a model or data set cached earlier
still loads at once, and anything else fails at once with ptq's sentence on how to point at local files.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

_TRUE = ("1", "true", "yes", "on")


@functools.cache
def reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import urllib.request

    try:
        urllib.request.urlopen(os.environ.get("HF_ENDPOINT", "https://huggingface.co") + "/api/models?limit=1",
                               timeout=timeout)  # fmt: skip
        return True
    except Exception:  # no network, DNS failure, proxy refusal: all mean "offline" here
        return False


@contextmanager
def offline():
    """Within: huggingface_hub and datasets read their caches only (their HF_HUB_OFFLINE settings, which
    they read from the environment at import, set for this block)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved

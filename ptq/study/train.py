"""``python -m ptq.study train data=<prepared corpus> out=<checkpoints>``: small Llama models from scratch.

For each model size (and training precision) one run with a constant learning rate after warm-up saves a
checkpoint at every token budget; the decayed arm branches off that run at (1 - decay_fraction) of each
budget and decays the learning rate linearly to zero by the budget (warmup-stable-decay, Hu et al. 2024,
"MiniCPM"), so that both arms share everything but the decay. A low-precision arm (``p_train``) trains
with the block linears' weights fake-quantized (symmetric, per output channel) through a straight-through
estimator, and saves the quantized weights the model actually used.

Checkpoints are Hugging Face folders (``LlamaForCausalLM``, bf16, with the corpus's tokenizer) holding a
``study.json``: non-embedding parameters N, training tokens D, schedule, training precision, losses.
Plain PyTorch: bf16 autocast, ``torch.compile``, fused AdamW.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptq.errors import UserError
from ptq.study.corpus import Corpus

log = logging.getLogger("ptq.study")

SCHEDULES = ("constant", "wsd")
HEAD_DIM = 32


@dataclass(frozen=True)
class ModelSize:
    """``d<hidden>-L<layers>``: Llama blocks with heads of 32, an MLP of about 8/3 the width (a multiple of 32)."""

    hidden: int
    layers: int

    @classmethod
    def parse(cls, name: str) -> ModelSize:
        match = re.fullmatch(r"d(\d+)-L(\d+)", name)
        if not match or int(match[1]) % HEAD_DIM or int(match[2]) < 1:
            raise UserError(f"sizes: {name!r} is not d<hidden>-L<layers> with hidden a multiple of {HEAD_DIM}")
        return cls(int(match[1]), int(match[2]))

    @property
    def name(self) -> str:
        return f"d{self.hidden}-L{self.layers}"

    @property
    def intermediate(self) -> int:
        return max(32, round(self.hidden * 8 / 3 / 32) * 32)

    def config(self, vocab_size: int, seqlen: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.hidden // HEAD_DIM,
            num_key_value_heads=self.hidden // HEAD_DIM,
            max_position_embeddings=seqlen,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            bos_token_id=None,
            eos_token_id=None,
        )


def non_embedding_params(model: nn.Module) -> int:
    """N of the scaling laws: every parameter except the token embedding and the output head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    sizes: list[str] = field(default_factory=lambda: ["d96-L4", "d160-L6", "d256-L8"])
    budgets: list[int] = field(default_factory=lambda: [25_000_000, 50_000_000, 100_000_000, 200_000_000])
    schedules: list[str] = field(default_factory=lambda: ["constant", "wsd"])
    decay_fraction: float = 0.2  # wsd: the last fifth of each budget decays the learning rate to zero
    p_train: list = field(default_factory=lambda: [None])  # None: bf16 training; 4, 6, 8: fake-quantized weights
    p_train_sizes: list[str] | None = None  # the sizes that get the low-precision arm (default: all)
    seqlen: int = 512
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3
    warmup_tokens: int = 2_000_000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_tokens: int = 262_144  # validation loss at each checkpoint (held-out books)
    train_tokens_limit: int | None = None  # use at most this many corpus tokens (the rest of the shards is unused)
    seed: int = 0
    device: str = "auto"
    compile: bool = True
    overwrite: bool = False

    @property
    def step_tokens(self) -> int:
        return self.seqlen * self.batch_size


def check_train(cfg: TrainConfig) -> list[ModelSize]:
    sizes = [ModelSize.parse(s) for s in cfg.sizes]
    if not cfg.budgets or any(int(b) < cfg.step_tokens * 10 for b in cfg.budgets):
        raise UserError(f"budgets={cfg.budgets}: each needs at least 10 steps of {cfg.step_tokens} tokens")
    unknown = [s for s in cfg.schedules if s not in SCHEDULES]
    if unknown or not cfg.schedules:
        raise UserError(f"schedules={cfg.schedules}: choose from {', '.join(SCHEDULES)}")
    if not 0 < cfg.decay_fraction < 1:
        raise UserError(f"decay_fraction={cfg.decay_fraction} must be in (0, 1)")
    bad = [p for p in cfg.p_train if p is not None and p not in range(2, 9)]
    if bad:
        raise UserError(f"p_train={cfg.p_train}: use null (bf16 training) or integer bits 2..8")
    if cfg.warmup_tokens >= min(cfg.budgets) * (1 - cfg.decay_fraction):
        raise UserError(f"warmup_tokens={cfg.warmup_tokens} must end before the smallest budget's decay starts")
    for name in cfg.p_train_sizes or []:
        if name not in cfg.sizes:
            raise UserError(f"p_train_sizes: {name} is not one of sizes={cfg.sizes}")
    return sizes


class FakeQuantSTE(nn.Module):
    """Weights rounded to a symmetric per-channel grid in the forward pass; gradients pass straight through
    (Bengio et al. 2013), so the full-precision latent weights keep learning."""

    def __init__(self, bits: int):
        super().__init__()
        from ptq.quant.spec import WeightSpec

        self.spec = WeightSpec(format="int", bits=bits, group_size=-1, sym=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        from ptq.quant.weight import fake_quantize_weight

        return weight + (fake_quantize_weight(weight.detach(), self.spec) - weight).detach()


def block_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def build_model(size: ModelSize, vocab_size: int, seqlen: int, p_train: int | None, seed: int) -> nn.Module:
    from torch.nn.utils import parametrize
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = size.config(vocab_size, seqlen)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if p_train is not None:
        for linear in block_linears(model):
            parametrize.register_parametrization(linear, "weight", FakeQuantSTE(p_train))
    return model


class Batches:
    """Training windows of ``seqlen + 1`` tokens, each epoch a seeded permutation of the corpus's windows;
    the stream is a function of the step alone, so a branch resumed from a snapshot sees the same data."""

    def __init__(self, tokens: np.ndarray, seqlen: int, batch_size: int, seed: int, device: torch.device):
        usable = (len(tokens) - 1) // seqlen * seqlen
        self.tokens = torch.from_numpy(tokens[: usable + 1].astype(np.int32)).to(device)
        self.windows = usable // seqlen
        self.seqlen, self.batch_size, self.seed, self.device = seqlen, batch_size, seed, device
        self._orders: dict[int, torch.Tensor] = {}
        self.offsets = torch.arange(seqlen + 1, device=device)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.windows, generator=generator).to(self.device)}
        return self._orders[epoch]

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.windows

    def get(self, step: int) -> torch.Tensor:
        first = step * self.batch_size
        picks = []
        while len(picks) < self.batch_size:
            epoch, index = divmod(first + len(picks), self.windows)
            take = min(self.batch_size - len(picks), self.windows - index)
            picks.extend(self._order(epoch)[index : index + take].unbind())
        starts = torch.stack(picks) * self.seqlen
        return self.tokens[starts[:, None] + self.offsets].long()


def learning_rate(cfg: TrainConfig, step: int, decay_start: int | None = None, decay_end: int | None = None) -> float:
    """Linear warm-up, then constant; inside [decay_start, decay_end) linear decay to zero."""
    warmup = max(1, cfg.warmup_tokens // cfg.step_tokens)
    lr = cfg.lr * min(1.0, (step + 1) / warmup)
    if decay_start is not None and step >= decay_start:
        lr *= max(0.0, (decay_end - step) / (decay_end - decay_start))
    return lr


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over ``windows`` [n, seqlen + 1]."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=batch.device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


class Trainer:
    """One model in training: its optimizer, step count and data stream."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, batches: Batches, device: torch.device):
        self.cfg, self.model, self.batches, self.device = cfg, model.to(device), batches, device
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
        )  # fmt: skip
        self.forward = torch.compile(model) if cfg.compile and device.type == "cuda" else model
        self.step = 0
        self.last_loss = float("nan")
        self.tokens_per_s = float("nan")  # of the last train_until

    def train_until(self, step_end: int, decay: tuple[int, int] | None = None) -> None:
        losses = []
        first, started = self.step, time.perf_counter()
        while self.step < step_end:
            lr = learning_rate(self.cfg, self.step, *(decay or (None, None)))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.batches.get(self.step)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.forward(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            self.step += 1
        if losses:
            self.last_loss = torch.stack(losses[-50:]).mean().item()  # also waits for the GPU
            self.tokens_per_s = (self.step - first) * self.cfg.step_tokens / (time.perf_counter() - started)

    def snapshot(self) -> dict:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
        }

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.step = snap["step"]


def checkpoint_name(size: ModelSize, schedule: str, p_train: int | None, tokens: int) -> str:
    return f"{size.name}-{schedule}-{'bf16' if p_train is None else f'w{p_train}'}-t{tokens / 1e6:g}M"


def save_checkpoint(model: nn.Module, folder: Path, tokenizer_folder: Path, meta: dict) -> None:
    """The model as the rest of ptq loads it: bf16 weights (low-precision arms: the quantized weights the
    forward pass used), the tokenizer, and ``study.json``."""
    from torch.nn.utils import parametrize
    from transformers import LlamaForCausalLM

    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight"] = module.weight.detach()  # the weights the forward pass used
    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(state)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.to(torch.bfloat16).save_pretrained(tmp)
    for item in tokenizer_folder.iterdir():
        shutil.copy(item, tmp / item.name)
    (tmp / "study.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train(cfg: TrainConfig) -> list[dict]:
    """Train the grid; returns the metadata of every checkpoint written (also in ``out/index.json``)."""
    from ptq.api import resolve_device

    sizes = check_train(cfg)
    corpus = Corpus.open(cfg.data)
    out = Path(cfg.out)
    if (out / "index.json").exists() and not cfg.overwrite:
        raise UserError(
            f"out={out} already holds trained checkpoints (index.json); choose another out or overwrite=true"
        )
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    train_ids = corpus.tokens("train", cfg.train_tokens_limit)
    val_ids = corpus.tokens("val", cfg.val_tokens + cfg.seqlen + 1)
    vocab = corpus.meta["vocab_size"]
    n_val = len(val_ids) // (cfg.seqlen + 1)
    val_windows = torch.from_numpy(val_ids[: n_val * (cfg.seqlen + 1)].astype(np.int64)).view(n_val, -1).to(device)
    budgets = sorted(int(b) for b in cfg.budgets)
    steps_of = {b: math.ceil(b / cfg.step_tokens) for b in budgets}
    index = []
    for size in sizes:
        arms = [p for p in cfg.p_train if p is None or cfg.p_train_sizes is None or size.name in cfg.p_train_sizes]
        for p_train in arms:
            started = time.perf_counter()
            model = build_model(size, vocab, cfg.seqlen, p_train, cfg.seed)
            n_params = non_embedding_params(model)
            batches = Batches(train_ids, cfg.seqlen, cfg.batch_size, cfg.seed, device)
            trainer = Trainer(cfg, model, batches, device)
            base = {
                "kind": "precision-checkpoint", "size": size.name, "n_params": n_params,
                "n_params_total": sum(p.numel() for p in model.parameters()), "p_train": p_train, "seed": cfg.seed,
                "vocab_size": vocab, "corpus_tokens": int(len(train_ids)),
                "tokenizer_sha256": corpus.meta["tokenizer_sha256"], "config": asdict(cfg),
            }  # fmt: skip

            def save(
                schedule: str, budget: int, base=base, p_train=p_train, size=size, trainer=trainer, started=started
            ):
                name = checkpoint_name(size, schedule, p_train, budget)
                meta = {
                    **base, "name": name, "schedule": schedule, "tokens": trainer.step * cfg.step_tokens,
                    "budget": budget, "step": trainer.step, "epochs": trainer.batches.epochs(trainer.step),
                    "train_loss": trainer.last_loss,
                    "val_loss": validation_loss(trainer.model, val_windows, cfg.batch_size),
                    "val_tokens": int(val_windows[:, 1:].numel()),
                }  # fmt: skip
                save_checkpoint(trainer.model, out / name, corpus.tokenizer_folder(), meta)
                index.append(meta)
                log.info(
                    "%s: train %.4f val %.4f (%.1f epochs; %.0f s, %.2fM tokens/s)", name, meta["train_loss"],
                    meta["val_loss"], meta["epochs"], time.perf_counter() - started, trainer.tokens_per_s / 1e6,
                )  # fmt: skip

            # One constant-rate run through every budget. Where a budget's decay starts, the wsd arm branches off:
            # a snapshot, the decay to the budget, the checkpoint, and back to the snapshot.
            decay_starts = {b: round(steps_of[b] * (1 - cfg.decay_fraction)) for b in budgets}
            for mark in sorted(set(decay_starts.values()) | set(steps_of.values())):
                trainer.train_until(mark)
                for b in budgets:
                    if "constant" in cfg.schedules and steps_of[b] == mark:
                        save("constant", b)
                for b in budgets:
                    if "wsd" in cfg.schedules and decay_starts[b] == mark:
                        snapshot = trainer.snapshot()
                        trainer.train_until(steps_of[b], decay=(decay_starts[b], steps_of[b]))
                        save("wsd", b)
                        trainer.restore(snapshot)
            log.info("%s p_train=%s: %.0f s", size.name, p_train, time.perf_counter() - started)
            del trainer, model
    (out / "index.json").write_text(json.dumps(index, indent=2))
    return index

"""Training and evaluating the tiny Llama models of the LDS evaluation (CPU, seconds each).

Every model starts from the same random initialization (``init_seed``) and trains with the same
recipe; only the training subset and the batch order (a seed per subset) change. Shapes: N
training examples, Q queries, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grass_llm.capture.loss import per_example_loss
from grass_llm.models import tiny_model


@dataclass(kw_only=True)
class TrainConfig:
    """Model sizes and the training recipe, shared by the full model and every subset model."""

    hidden_size: int = 64
    """Model width; attention projections are hidden x hidden."""
    intermediate_size: int = 128
    """MLP width; gate/up are intermediate x hidden, down is hidden x intermediate."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Attention heads (key/value heads too, so k/v projections are hidden x hidden)."""
    epochs: int = 20
    """Passes over the (sub)set: a half subset gets half the optimizer steps."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 3e-3
    """AdamW learning rate (constant after a 20-step linear warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    init_seed: int = 0
    """Seed of the shared random initialization."""

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "epochs",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_heads={self.num_heads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def build_model(cfg: TrainConfig, vocab_size: int, max_len: int) -> torch.nn.Module:
    """The shared initialization: a tiny random Llama (grass_llm.models.tiny_model)."""
    return tiny_model("llama", seed=cfg.init_seed, vocab_size=vocab_size,
                      hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                      num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                      intermediate_size=cfg.intermediate_size, max_positions=max_len)


def train(cfg: TrainConfig, batch: tuple[torch.Tensor, ...], subset_N: torch.Tensor | None,
          vocab_size: int, *, seed: int) -> torch.nn.Module:
    """Train a fresh model on ``batch`` rows where ``subset_N`` (bool) is True (all if None).

    Args:
        cfg: sizes and recipe.
        batch: ``(input_ids, attention_mask, labels)``, each ``[N, T]``.
        subset_N: ``[N]`` bool, which training examples this model sees.
        vocab_size: the corpus' vocabulary size.
        seed: seed of the batch order.

    Returns:
        The trained model in eval mode.
    """
    ids, mask, labels = batch
    rows = torch.arange(ids.shape[0]) if subset_N is None else subset_N.nonzero().squeeze(1)
    if rows.numel() == 0:
        raise ValueError("empty training subset")
    model = build_model(cfg, vocab_size, ids.shape[1]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        order = rows[torch.randperm(rows.numel(), generator=gen)]
        for sl in order.split(cfg.batch_size):
            logits = model(input_ids=ids[sl], attention_mask=mask[sl], use_cache=False).logits
            # mean over the batch's target tokens: the usual LM objective
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[sl, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def example_losses(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[N]`` each example's loss: the sum of its target tokens' NLL (the capture's loss)."""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return per_example_loss(logits, labels, "sum")[0]

"""Output sensitivity: how far quantizing one module moves the next-token distribution (KL, nats).

Two estimators:

* ``"fisher"`` (cheap, one forward + backward per calibration sample): the second-order expansion of
  the KL to the 16-bit model, ``KL ≈ ½ Σ F ⊙ ΔW²`` with ``F`` the diagonal Fisher information of the
  model's *own* predictive distribution. Labels are sampled from the 16-bit model at every scored
  position, so the squared per-sample gradients are an unbiased estimate of the Fisher summed over
  tokens; dividing by the number of scored tokens gives a mean per-token KL. Scores are in nats and
  their sum approximates the KL of uniform 4-bit (interactions between modules ignored).
* ``"loo"`` (exact, leave-one-out): quantize only this module, run the calibration set, measure the
  mean per-token KL to the 16-bit model. One forward per module and sample: for small models and
  for validating the estimator.

Example:
    >>> import torch
    >>> logp = torch.log_softmax(torch.randn(5, 10), -1)
    >>> abs(round(float(kl_sum(logp, logp)), 6))
    0.0
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from .corrections import residual_ranks

__all__ = ["FisherAccumulator", "kl_sum", "sample_labels", "spearman", "top1_agreement"]


def kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of ``KL(p_ref || p)`` (nats); ``ref_logp`` are log-probs, ``logits`` raw.

    Example:
        >>> logits = torch.randn(3, 7)
        >>> round(float(kl_sum(torch.log_softmax(logits, -1), logits)), 6)
        0.0
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def top1_agreement(ref_logp: torch.Tensor, logits: torch.Tensor) -> int:
    """Number of positions where the two distributions have the same most likely token.

    Example:
        >>> x = torch.randn(4, 9)
        >>> top1_agreement(torch.log_softmax(x, -1), x)
        4
    """
    return int((ref_logp.argmax(-1) == logits.argmax(-1)).sum())


def sample_labels(ref_logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from the model's own distribution (true-Fisher labels).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_labels(torch.log_softmax(torch.randn(3, 5), -1), g).shape
        torch.Size([3])
    """
    probs = ref_logp.detach().float().exp().cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(ref_logp.device)


class FisherAccumulator:
    """Fisher-weighted 4-bit error ``½ Σ_samples Σ (g ⊙ ΔW)²`` of each weight, summed as gradients arrive.

    ``g`` is one sample's gradient of the weight and ``ΔW`` the 4-bit round trip minus the weight, so
    the sum equals ``½ Σ F ⊙ ΔW²`` with the empirical Fisher ``F = Σ_samples g²`` — without ever
    holding ``F`` (a full-size fp32 copy of every weight).

    With ``corrections``, the corrected weights are also scored with the *full* Fisher quadratic form
    ``½ ΔWᵀ F ΔW``, estimated without bias as ``½ Σ_samples (g · ΔW)²`` (labels are sampled from the
    model, so the cross-token terms vanish in expectation): the plain NF4 error of every weight
    (:meth:`full_scores`, given a rank menu) and the residual after each rank of a correction (:meth:`gains`). The diagonal form cannot see
    that an activation-aware correction removes the error exactly in the input directions the
    gradients live in, and undervalues it against 16-bit keeps (measured on SmolLM2-135M).

    Args:
        weights: ``{name: parameter}`` whose ``.grad`` is read after each sample's backward pass.
        dequantized: ``{name: 4-bit round trip of that weight}``.
        corrections: ``{name: (A, B)}`` correction factors (``deq + B @ A`` is the corrected weight).
        ranks: the rank menu to score (each up to the factors' rank).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> acc = FisherAccumulator({"m": w}, {"m": torch.full((2, 2), 1.5)})
        >>> (w * torch.tensor([[1.0, 0.0], [0.0, 0.0]])).sum().backward()
        >>> acc.accumulate()
        >>> acc.scores(num_tokens=1)["m"]
        0.125
    """

    def __init__(
        self,
        weights: dict[str, torch.nn.Parameter],
        dequantized: dict[str, torch.Tensor],
        corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        ranks: Sequence[int] = (),
    ) -> None:
        self.weights = weights
        self.dequantized = dequantized
        self.corrections = corrections or {}
        self.ranks = tuple(ranks)
        self.totals: dict[str, float] = {}
        self.full_totals: dict[str, float] = {}
        self.rank_totals: dict[str, dict[int, float]] = {}
        self._factors: dict[str, tuple[torch.Tensor, ...]] = {}  # fp32 copies, made once

    def accumulate(self) -> None:
        """Add this sample's ``Σ (g ⊙ ΔW)²`` for every weight with a gradient (and the full-Fisher
        terms of the corrected ones), and reset the gradients."""
        for name, weight in self.weights.items():
            if weight.grad is not None:
                self._consume(name, weight)

    @contextlib.contextmanager
    def consuming_gradients(self) -> Iterator[None]:
        """Within the block, each weight's gradient is scored the moment backward has summed it, then
        freed (``register_post_accumulate_grad_hook``): a backward pass never holds the gradients of
        every weight at once. The scores are those :meth:`accumulate` would give.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> acc = FisherAccumulator({"m": w}, {"m": torch.full((2, 2), 1.5)})
            >>> with acc.consuming_gradients():
            ...     (w * torch.tensor([[1.0, 0.0], [0.0, 0.0]])).sum().backward()
            >>> w.grad is None, acc.scores(num_tokens=1)["m"]
            (True, 0.125)
        """
        handles = [weight.register_post_accumulate_grad_hook(lambda param, name=name: self._consume(name, param))
                   for name, weight in self.weights.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _consume(self, name: str, weight: torch.nn.Parameter) -> None:
        with torch.no_grad():
            grad = weight.grad.float()
            delta = self.dequantized[name].float() - weight.detach().float()
            self.totals[name] = self.totals.get(name, 0.0) + float((grad * delta).pow(2).sum())
            if self.ranks:
                self.full_totals[name] = self.full_totals.get(name, 0.0) + float((grad * delta).sum()) ** 2
            if name in self.corrections:
                self._accumulate_ranks(name, grad, delta)
        weight.grad = None

    def _accumulate_ranks(self, name: str, grad: torch.Tensor, delta: torch.Tensor) -> None:
        """``(g · (ΔW_4bit + B_r·A_r))²`` for every rank the module's correction provides."""
        a, b = self._factors.setdefault(name, tuple(f.to(delta.device, torch.float32) for f in self.corrections[name]))
        totals = self.rank_totals.setdefault(name, {})
        done = 0
        for rank in residual_ranks(a.shape[0], self.ranks):
            delta = delta + b[:, done:rank] @ a[done:rank]
            done = rank
            totals[rank] = totals.get(rank, 0.0) + float((grad * delta).sum()) ** 2

    def scores(self, num_tokens: int) -> dict[str, float]:
        """``½ Σ F ⊙ ΔW² / num_tokens`` per weight (nats per scored token); 0 for a weight no gradient reached."""
        return self._per_token(self.totals, num_tokens)

    def full_scores(self, num_tokens: int) -> dict[str, float]:
        """``½ ΔWᵀ F ΔW / num_tokens`` (full Fisher) per weight, in the units of :meth:`scores` (with a rank menu only)."""
        return self._per_token(self.full_totals, num_tokens) if self.ranks else {}

    def _per_token(self, totals: dict[str, float], num_tokens: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.weights:
            total = totals.get(name)
            if total is None or num_tokens == 0:
                out[name] = 0.0 if total is None else float("nan")
                continue
            value = 0.5 * total / num_tokens
            out[name] = value if math.isfinite(value) else float("nan")
        return out

    def gains(self, num_tokens: int) -> dict[str, dict[int, float]]:
        """Per corrected weight and rank, the full-Fisher KL a rank-r correction removes:
        ``½ (ΔWᵀ F ΔW - residualᵀ F residual) / num_tokens``.

        In the units of :meth:`full_scores`, so a gain and the module's full score add up: the
        gain of a good correction approaches the score, a harmful one is negative.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2, 2))
            >>> fix = (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))   # A (1x2), B (2x1): B·A = e00
            >>> acc = FisherAccumulator({"m": w}, {"m": -torch.eye(2)}, {"m": fix}, ranks=[1])
            >>> w.sum().backward(); acc.accumulate()      # g = ones: (g·ΔW)² = 4, after the correction (g·(ΔW + e00))² = 1
            >>> acc.full_scores(1)["m"], acc.gains(1)["m"]
            (2.0, {1: 1.5})
        """
        full = self.full_scores(num_tokens)
        return {
            name: {rank: full[name] - 0.5 * total / num_tokens for rank, total in totals.items()}
            for name, totals in self.rank_totals.items() if num_tokens
        }


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (NaN pairs dropped).

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 25]), 6)
        0.8
    """
    import pandas as pd

    frame = pd.DataFrame({"a": list(a), "b": list(b)}).dropna()
    if len(frame) < 2:
        return float("nan")
    return float(frame["a"].rank().corr(frame["b"].rank()))

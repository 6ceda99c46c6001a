"""Error-correcting low-rank factors: what a rank-r correction ``B·A`` on top of NF4 recovers, per module.

With ``ΔW = W - deq(NF4(W))`` and ``C = E[x xᵀ]`` the second moment of the module's calibration
inputs, take ``S = C^½`` (eigendecomposition, damped), the SVD ``ΔW·S = U Σ Vᵀ`` and keep rank r:
``B = U_r Σ_r``, ``A = V_rᵀ S⁻¹``. Then ``deq(NF4(W)) + B·A`` has the smallest output error on the
calibration inputs among rank-r corrections (EoRA / QERA). The plain SVD of ``ΔW`` (LoftQ) ignores
which input directions the module actually sees and recovers far less.

Second moments are large (a 8960-wide input is 321 MB in fp32), so :func:`fit_corrections`
collects them for a few modules at a time, within ``max_bytes``, fits those modules and frees them.
Modules fed the same input tensor (q/k/v, gate/up) share one matrix.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(512, 32) * torch.linspace(0.1, 3, 32)    # inputs with uneven directions
    >>> delta = torch.randn(16, 32) * 0.01
    >>> a, b = fit_correction(delta, x.T @ x / len(x), rank=8)
    >>> weighted = ((x @ (delta - (b @ a).float()).T).norm() / (x @ delta.T).norm()).item()
    >>> u, s, vh = torch.linalg.svd(delta)
    >>> plain = ((x @ (delta - u[:, :8] * s[:8] @ vh[:8]).T).norm() / (x @ delta.T).norm()).item()
    >>> weighted < plain
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AnalysisError
from ..progress import progress_bar

__all__ = ["DEFAULT_RANKS", "InputMoments", "check_ranks", "fit_correction", "fit_corrections", "fit_from_moments", "residual_ranks"]

DEFAULT_RANKS = (4, 8, 16, 32, 64)
DAMPING = 0.01  # added to C's diagonal, as a fraction of its mean (keeps S⁻¹ bounded on unused directions)
MOMENT_BYTES = 2**30  # second moments held at once while fitting


def check_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
    """Sorted distinct positive ranks, or :class:`dq_kit.AnalysisError`.

    Example:
        >>> check_ranks([16, 4, 4])
        (4, 16)
    """
    try:
        values = tuple(sorted({int(r) for r in ranks}))
    except (TypeError, ValueError):
        raise AnalysisError(f"correction ranks must be positive integers, got {ranks!r}.") from None
    if not values or values[0] < 1:
        raise AnalysisError(f"correction ranks must be positive integers, got {ranks!r}.")
    return values


def fit_correction(delta: torch.Tensor, moment: torch.Tensor, rank: int, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-weighted rank-``rank`` factors ``(A, B)`` with ``B @ A ≈ delta`` where the inputs are.

    Args:
        delta: ``W - deq(NF4(W))``, shape ``(out, in)``.
        moment: ``E[x xᵀ]`` of the module's inputs, shape ``(in, in)``.
        rank: kept rank (at most ``min(out, in)``).
        damping: added to the diagonal of ``moment`` as a fraction of its mean.

    Returns:
        ``A`` of shape ``(rank, in)`` and ``B`` of shape ``(out, rank)``, in bf16 (as stored), so that
        ``deq + B @ A`` is the corrected weight.

    Example:
        >>> a, b = fit_correction(torch.randn(6, 4), torch.eye(4), rank=2)
        >>> tuple(a.shape), tuple(b.shape), a.dtype
        ((2, 4), (6, 2), torch.bfloat16)
    """
    out_features, in_features = delta.shape
    if rank > min(out_features, in_features):
        raise AnalysisError(f"rank {rank} exceeds min(out, in) = {min(out_features, in_features)}.")
    c = moment.float()
    c = c + damping * c.diagonal().mean().clamp_min(1e-12) * torch.eye(in_features, dtype=c.dtype, device=c.device)
    values, vectors = torch.linalg.eigh(c)  # C = V diag(λ) Vᵀ, so S = C^½ = V diag(√λ) Vᵀ
    root = values.clamp_min(values.max() * 1e-12).sqrt()
    # SVD of ΔW·S = (ΔW V diag(√λ)) Vᵀ: the same U and Σ as of ΔW V diag(√λ), right vectors rotated by Vᵀ;
    # then A = V_rᵀ S⁻¹ = Vh_r diag(1/√λ) Vᵀ. S and S⁻¹ are never formed.
    u, sigma, vh = torch.linalg.svd((delta.float() @ vectors) * root, full_matrices=False)
    b = u[:, :rank] * sigma[:rank]
    a = (vh[:rank] / root) @ vectors.T
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


class InputMoments:
    """Sums ``xᵀx`` of the inputs of chosen Linear modules while the model runs (forward pre-hooks).

    A module fed the very tensor the previously called module got (q/k/v, gate/up) shares that
    module's matrix instead of holding its own.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with InputMoments({"lin": lin}) as moments:
        ...     _ = lin(torch.ones(4, 3))
        >>> moments.moment("lin")[0, 0].item()
        1.0
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.owner: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[Any, str] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> InputMoments:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            previous = self._last
            self._last = (weakref.ref(x), name)
            if name not in self.owner:
                shared = previous is not None and previous[0]() is x and previous[1] != name
                self.owner[name] = self.owner[previous[1]] if shared else name
            key = self.owner[name]
            if key != name:
                return
            with torch.no_grad():
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                if key in self.sums:
                    self.sums[key].addmm_(rows.T, rows)
                else:
                    self.sums[key] = rows.T @ rows
                self.counts[key] = self.counts.get(key, 0) + rows.shape[0]

        return hook

    def moment(self, name: str) -> torch.Tensor | None:
        """``E[x xᵀ]`` of ``name``'s inputs (``None`` when the module never ran).

        Example:
            >>> lin = nn.Linear(2, 2)
            >>> with InputMoments({"lin": lin}) as moments:
            ...     _ = lin(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
            >>> moments.moment("lin").tolist()
            [[5.0, 1.0], [1.0, 2.0]]
        """
        key = self.owner.get(name)
        if key is None or not self.counts.get(key):
            return None
        return self.sums[key] / self.counts[key]


def fit_corrections(
    modules: dict[str, nn.Module],
    deltas: Callable[[str], torch.Tensor],
    run: Callable[[], None],
    ranks: Sequence[int],
    *,
    max_bytes: int = MOMENT_BYTES,
    progress: bool | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
    """Fit the largest useful rank of ``ranks`` for every module, a few modules' moments at a time.

    Args:
        modules: ``{name: Linear}`` in call order.
        deltas: ``name -> W - deq(NF4(W))`` (computed on demand, not held for all modules).
        run: runs the calibration samples through the model (no gradients needed); called once
            per group of modules whose second moments fit in ``max_bytes``.
        ranks: the rank menu; each module is fitted at ``min(max(ranks), min(in, out))``.
        max_bytes: second-moment bytes held at once (a 1-wide group when one module alone exceeds it).
        progress: show a progress bar over the groups.

    Returns:
        ``({name: (A, B)}, {name: [reason, ...]})``: factors at the fitted rank, and why a module has
        none (never ran on calibration data, non-finite fit). Ranks above ``min(in, out)`` are
        skipped: the report's gain of such a rank is NaN.

    Example:
        >>> lin = nn.Linear(8, 8)
        >>> factors, notes = fit_corrections({"lin": lin}, lambda n: torch.randn(8, 8), lambda: lin(torch.randn(5, 8)), [4, 16],
        ...                                  progress=False)
        >>> tuple(factors["lin"][0].shape), notes
        ((4, 8), {})
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    notes: dict[str, list[str]] = {}
    groups: list[list[str]] = []
    size = 0
    for name, module in modules.items():
        need = 4 * module.in_features**2
        if groups and size + need <= max_bytes:
            groups[-1].append(name)
            size += need
        else:
            groups.append([name])
            size = need
    for group in progress_bar(groups, progress if len(groups) > 1 else False, "Corrections: input moments"):
        with InputMoments({name: modules[name] for name in group}) as moments:
            run()
        fitted, found = fit_from_moments(moments, deltas, ranks)
        factors.update(fitted)
        notes.update(found)
        del moments
    return factors, notes


def fit_from_moments(
    moments: InputMoments, deltas: Callable[[str], torch.Tensor], ranks: Sequence[int]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
    """Fit every module ``moments`` watched, at the largest menu rank it allows (see :func:`fit_corrections`).

    Example:
        >>> lin = nn.Linear(4, 6)
        >>> with InputMoments({"lin": lin}) as moments:
        ...     _ = lin(torch.randn(10, 4))
        >>> factors, notes = fit_from_moments(moments, lambda n: torch.randn(6, 4), [2])
        >>> tuple(factors["lin"][1].shape), notes
        ((6, 2), {})
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    notes: dict[str, list[str]] = {}
    for name, module in moments.modules.items():
        usable = [r for r in ranks if r <= min(module.in_features, module.out_features)]  # larger ones: NaN gains
        moment = moments.moment(name)
        if not usable:
            continue
        if moment is None:
            notes.setdefault(name, []).append("no calibration input reached this module: no correction")
            continue
        delta = deltas(name).to(moment.device)
        try:
            a, b = fit_correction(delta, moment, max(usable)) if torch.isfinite(delta).all() and torch.isfinite(moment).all() else (None, None)
        except torch.linalg.LinAlgError:
            a = b = None
        if a is None or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            notes.setdefault(name, []).append("non-finite correction factors: left at NF4")
            continue
        factors[name] = (a, b)
    return factors, notes


def residual_ranks(rank: int, ranks: Sequence[int]) -> list[int]:
    """The menu ranks a correction fitted at ``rank`` provides (its leading columns are each lower-rank fit).

    Example:
        >>> residual_ranks(32, (4, 8, 16, 32, 64))
        [4, 8, 16, 32]
    """
    return [r for r in ranks if r <= rank]

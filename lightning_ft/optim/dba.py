"""Dynamic Boosted Annealing (DBA, Tang et al. 2025, arXiv 2509.26242): the functional core, no Trainer needed.

DBA fine-tunes on domain data alone and keeps general skills with a gradient estimated once on general data:

1. **Global gradient** (:func:`estimate_global_gradient`): the mean gradient of the training loss over ``s`` general
   batches at the starting weights, what the paper gets from a zero-learning-rate pass with Adam's ``beta1 -> 1``.
   The parameters never move; optionally each matrix is stored as a rank-``r`` factorisation (the paper compresses it
   with an SVD; the rank is not published) in a :class:`GlobalGradient`, which can be saved and reused for the same
   base model across domains.
2. **Global-gradient boost**: every domain step uses ``g_t + k_t * ghat`` (:func:`boost_gradients_`), with ``k_t``
   from :func:`boost_coefficient` (``k0 = 200 / T`` as the reviews quote the paper; the decay form is unknown, ours is
   linear to 0 at the last step).
3. **Dynamic correction**: the boosted gradient is scaled by ``c_t = f(cos(g_t, ghat))``; the paper's formula is
   unknown, :class:`LinearCorrection` (``1 + gamma * (1 - cos)`` clipped) is our reconstruction, any callable
   ``cos -> c`` can replace it.
4. **Annealing**: a small initial learning rate and a decay, an ordinary LR scheduler
   (:class:`AnnealingSchedule` for ``LambdaLR``; the paper's schedule and values are unknown).

:class:`~lightning_ft.optim.DynamicBoostedAnnealing` runs 1-3 inside a Lightning fit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_ft._internal.forward import cast_inputs, has_user_loss, model_dtype, model_logits, model_loss
from lightning_ft._internal.modules import training_mode
from lightning_ft._internal.validation import check_int

__all__ = [
    "AnnealingSchedule",
    "GlobalGradient",
    "LinearCorrection",
    "Task",
    "batch_loss",
    "boost_coefficient",
    "boost_gradients_",
    "estimate_global_gradient",
    "resolve_k0",
]

Task = Literal["auto", "classification", "causal_lm"]
Decay = Literal["linear", "constant"]
LossFn = Callable[[nn.Module, Any], Tensor]

K0_STEPS = 200.0
"""``k0 = "auto"`` is ``K0_STEPS / T`` (the reviews quote ``k0 = 200 / T`` as the paper's best)."""


# --- the loss ---------------------------------------------------------------------------------------------------------


def _causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    logits = model_logits(model, inputs)
    labels = batch.get("labels", batch["input_ids"]).to(logits.device)
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _check_task(task: str) -> None:
    if task not in ("auto", "classification", "causal_lm"):
        raise ValueError(f'`task` must be "auto", "classification" or "causal_lm", got {task!r}.')


def batch_loss(model: nn.Module, batch: Any, task: Task = "auto") -> Tensor:
    """The training loss of ``batch`` that DBA differentiates.

    * the model's ``lightning_ft_loss(batch)`` when it defines one (the one documented way to give every lightning-ft
      callback your loss);
    * ``task="causal_lm"``: next-token cross-entropy, Hugging Face convention (``labels`` aligned with ``input_ids``,
      shifted here, ``-100`` ignored; ``labels`` default to ``input_ids``); the forward gets ``input_ids`` and
      ``attention_mask``;
    * ``task="classification"``: cross-entropy of the forward's logits against the batch's labels
      (:func:`~lightning_ft._internal.forward.model_loss`);
    * ``task="auto"``: ``"causal_lm"`` for mapping batches with ``input_ids``, else ``"classification"``.
    """
    _check_task(task)
    if has_user_loss(model):
        return model_loss(model, batch)[0]
    lm = isinstance(batch, Mapping) and "input_ids" in batch
    if task == "causal_lm" or (task == "auto" and lm):
        if not lm:
            raise ValueError(
                "task='causal_lm' needs mapping batches with an `input_ids` entry (and optionally `labels`,"
                f" `attention_mask`), got a {type(batch).__name__}; define `lightning_ft_loss(batch)` on the module"
                " for other batches."
            )
        return _causal_lm_loss(model, batch)
    return model_loss(model, batch)[0]


# --- the global gradient ----------------------------------------------------------------------------------------------


@dataclass
class GlobalGradient:
    """The general-data gradient ``ghat`` at the starting weights, by parameter name, in float32.

    Each entry is either dense (``dense[name]``, the parameter's shape) or a rank-``r`` factorisation of the parameter
    viewed as a matrix ``(shape[0], -1)``: ``ghat ~= left @ right.T`` (``factors[name] = (left, right)``, ``left`` =
    ``U * S``). ``batches`` and ``samples`` record how much general data the estimate used.

    Example::

        ghat = estimate_global_gradient(model, general_loader, max_batches=64, rank=8)
        ghat.save("ghat.pt")  # reuse for the same base model on every domain
        ghat = GlobalGradient.load("ghat.pt")
    """

    dense: dict[str, Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rank: int | None = None
    batches: int = 0
    samples: int = 0
    _sq_norms: dict[Any, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        """The parameter names ``ghat`` covers, in the model's order."""
        return list(self.shapes)

    def numel(self) -> int:
        """Floating values held (the dense entries plus the factors)."""
        return sum(t.numel() for t in self.dense.values()) + sum(
            a.numel() + b.numel() for a, b in self.factors.values()
        )

    def to_dense(self, name: str) -> Tensor:
        """``ghat`` of parameter ``name`` in its shape (rebuilt from the factors for a low-rank entry)."""
        if name in self.dense:
            return self.dense[name]
        left, right = self.factors[name]
        return (left @ right.T).view(self.shapes[name])

    def to(self, device: torch.device | str) -> GlobalGradient:
        """A copy on ``device`` (float32 kept)."""
        return GlobalGradient(
            {k: v.to(device) for k, v in self.dense.items()},
            {k: (a.to(device), b.to(device)) for k, (a, b) in self.factors.items()},
            dict(self.shapes),
            self.rank,
            self.batches,
            self.samples,
        )

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor held (for collectives)."""
        for name in self.shapes:
            if name in self.dense:
                yield self.dense[name]
            else:
                yield from self.factors[name]

    # --- products with gradients ---------------------------------------------------------------------------------

    def dot(self, name: str, grad: Tensor) -> Tensor:
        """``<grad, ghat[name]>`` in float32 (a low-rank entry is not densified)."""
        if name in self.dense:
            return torch.sum(grad.float() * self.dense[name])
        left, right = self.factors[name]
        return torch.sum((grad.float().reshape(left.shape[0], -1) @ right) * left)

    def sq_norm(self, name: str) -> Tensor:
        """``||ghat[name]||^2`` in float32 (cached: the estimate does not change)."""
        if name not in self._sq_norms:
            self._sq_norms[name] = self._sq_norm(name)
        return self._sq_norms[name]

    def _sq_norm(self, name: str) -> Tensor:
        if name in self.dense:
            return self.dense[name].square().sum()
        left, right = self.factors[name]
        return torch.sum((left.T @ left) * (right.T @ right))

    def norm(self) -> float:
        """The Euclidean norm of the whole ``ghat``."""
        return math.sqrt(sum(float(self.sq_norm(n)) for n in self.names))

    def add_to_(self, name: str, grad: Tensor, alpha: float) -> None:
        """``grad += alpha * ghat[name]`` in place (in ``grad``'s dtype; a low-rank entry is added as a product of its
        factors, without a dense copy, when ``grad`` is contiguous)."""
        if name in self.dense:
            grad.add_(self.dense[name].to(grad.dtype), alpha=alpha)
            return
        left, right = self.factors[name]
        if grad.is_contiguous():
            grad.view(left.shape[0], -1).addmm_(left.to(grad.dtype), right.T.to(grad.dtype), alpha=alpha)
        else:
            grad.add_((left @ right.T).view(self.shapes[name]).to(grad.dtype), alpha=alpha)

    def cosine(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Cosine between ``grads`` (name -> gradient) and ``ghat``, over the names both hold (0 when either is 0)."""
        names = [n for n in self.names if n in grads and grads[n] is not None]
        if not names:
            raise ValueError(f"none of the gradients' names {sorted(grads)[:5]} is covered by the global gradient.")
        dot = torch.stack([self.dot(n, grads[n]) for n in names]).sum()
        g2 = torch.stack([grads[n].float().square().sum() for n in names]).sum()
        key = (tuple(names), dot.device)  # the same names every step: their total is computed once
        if key not in self._sq_norms:
            self._sq_norms[key] = torch.stack([self.sq_norm(n).to(dot.device) for n in names]).sum()
        return dot / (g2 * self._sq_norms[key]).sqrt().clamp_min(1e-30)

    # --- controls ------------------------------------------------------------------------------------------------

    def randomized(self, seed: int = 0) -> GlobalGradient:
        """A no-information control: a dense Gaussian direction with each parameter's norm equal to ``ghat``'s."""
        generator = torch.Generator().manual_seed(seed)
        dense = {}
        for name in self.names:
            noise = torch.randn(self.shapes[name], generator=generator)
            target = float(self.sq_norm(name)) ** 0.5
            device = self.dense[name].device if name in self.dense else self.factors[name][0].device
            dense[name] = (noise * (target / max(float(noise.norm()), 1e-30))).to(device)
        return GlobalGradient(dense, {}, dict(self.shapes), None, self.batches, self.samples)

    # --- serialisation -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable state (CPU tensors): what a checkpoint holds."""
        return {
            "dense": {k: v.detach().cpu().clone() for k, v in self.dense.items()},
            "factors": {k: (a.detach().cpu().clone(), b.detach().cpu().clone()) for k, (a, b) in self.factors.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "rank": self.rank,
            "batches": self.batches,
            "samples": self.samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this estimate with ``state`` (from :meth:`state_dict`)."""
        self._sq_norms = {}
        self.dense = {k: v.float() for k, v in state["dense"].items()}
        self.factors = {k: (a.float(), b.float()) for k, (a, b) in state["factors"].items()}
        self.shapes = {k: tuple(v) for k, v in state["shapes"].items()}
        self.rank, self.batches, self.samples = state.get("rank"), state.get("batches", 0), state.get("samples", 0)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GlobalGradient:
        out = cls()
        out.load_state_dict(state)
        return out

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (``torch.save`` of :meth:`state_dict`)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GlobalGradient:
        """Read a file written by :meth:`save`."""
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))


def _low_rank(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U * S, V)`` of a rank-``rank`` randomised SVD (4 extra columns of oversampling, 2 power iterations), seeded
    (the global RNG is left as it was)."""
    q = min(rank + 4, *matrix.shape)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=2)
    return (u[:, :rank] * s[:rank]).contiguous(), v[:, :rank].contiguous()


def _compress(dense: dict[str, Tensor], rank: int | None) -> GlobalGradient:
    out = GlobalGradient(shapes={k: tuple(v.shape) for k, v in dense.items()}, rank=rank)
    for name, g in dense.items():
        rows = g.shape[0] if g.dim() >= 2 else 0
        cols = g.numel() // rows if rows else 0
        # a factorisation is kept where it is smaller than the matrix
        if rank is not None and g.dim() >= 2 and rank * (rows + cols) < rows * cols:
            out.factors[name] = _low_rank(g.reshape(rows, cols), rank)
        else:
            out.dense[name] = g
    return out


@contextlib.contextmanager
def _pass_state(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Train mode for the pass; afterwards each submodule's mode, the buffers (BatchNorm statistics), the parameters'
    ``.grad`` and the global RNG are as they were."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), training_mode(model, True):
            for p in params:
                p.grad = None
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def _batches(loader: Iterable[Any], max_batches: int | None) -> int:
    if max_batches is not None:
        try:
            return min(max_batches, len(loader))  # type: ignore[arg-type]
        except TypeError:
            return max_batches
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "the general-data loader has no length: pass `max_batches` (how many general batches to average)."
        ) from None


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return 0


def _backward(
    model: nn.Module,
    batch: Any,
    loss_of: LossFn,
    context: Callable[[], Any],
    params: list[nn.Parameter],
    scale: float,
    dynamic: bool,
) -> float:
    """Back-propagate ``scale * loss``; with a grad scaler (``16-mixed``), halve ``scale`` and retry while a gradient
    overflows, as the scaler does between steps. Returns the scale the gradients carry."""
    while True:
        with context():
            loss = loss_of(model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(f"the loss must be a scalar tensor, got {type(loss).__name__}.")
        (loss.float() * scale).backward()
        if not dynamic or all(torch.isfinite(p.grad).all() for p in params if p.grad is not None) or scale <= 1.0:
            return scale
        for p in params:
            p.grad = None
        scale /= 2.0


def estimate_global_gradient(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    rank: int | None = None,
    *,
    task: Task = "auto",
    trainer: Any | None = None,
    progress: bool | None = None,
    desc: str = "DBA global gradient",
) -> GlobalGradient:
    """The mean training-loss gradient of ``model`` over general data, at its current weights (DBA's ``ghat``).

    Equivalent to the paper's zero-learning-rate pass: ``model`` runs in train mode (dropout on, as in training),
    every batch's loss is back-propagated and the gradients are averaged over batches in float32; no optimizer is
    involved, the parameters are not changed, and afterwards the parameters' ``.grad``, the buffers (BatchNorm running
    statistics), each submodule's train/eval mode and the global RNG are as before (a fit with DBA draws the same
    batches and dropout masks as one without). Only parameters with ``requires_grad`` are covered.

    Args:
        model: the starting model (a ``LightningModule`` or any ``nn.Module``).
        loader: general-data batches.
        loss_fn: ``(model, batch) -> scalar loss``; None: :func:`batch_loss` with ``task``.
        max_batches: average over the first ``max_batches`` batches (None: the whole loader).
        rank: store each parameter of 2 or more dimensions (viewed as ``(shape[0], -1)``) as a rank-``rank``
            randomised SVD where that is smaller (the paper's SVD compression; its rank is unknown); None: dense.
        task: the default loss's task (see :func:`batch_loss`).
        trainer: the fit's Trainer, for its precision context (bf16 autocast; a ``16-mixed`` loss is scaled by the
            grad scaler's scale, halved while a gradient overflows, and unscaled after), a progress bar following
            ``enable_progress_bar``, and under an initialised process group with several ranks each rank's shard of
            ``loader`` (the ranks' batches ``k`` together are the one-process batch ``k``; gradients all-reduced, so
            every rank gets the same ``ghat``).
        progress: force the progress bar on or off (None: follow ``trainer``).
        desc: the progress bar's label.
    """
    from lightning_ft._internal.distributed import OfflineGroup
    from lightning_ft._internal.offline import OfflinePhase, forward_context

    check_int("max_batches", max_batches, allow_none=True)
    check_int("rank", rank, allow_none=True)
    if loss_fn is None:
        _check_task(task)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: there is nothing to boost.")
    group = OfflineGroup(trainer)
    shard = group.distributed and group.can_shard(loader)
    local = group.shard(loader) if shard else loader
    n_batches = _batches(local, max_batches)
    loss_of = loss_fn or (lambda m, b: batch_loss(m, b, task))
    context = forward_context(trainer, model)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    params = [p for _, p in named]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    seen = samples = 0
    failed: BaseException | None = None
    with _pass_state(model, params):
        phase = OfflinePhase(desc, n_batches, trainer, progress)
        batches = iter(local)
        try:
            for _ in phase:
                batch = next(batches, None)
                if batch is None:
                    break
                batch = cast_inputs(batch, params[0].device, model_dtype(model))
                scale = _backward(model, batch, loss_of, context, params, scale, scaler is not None)
                for p, acc in zip(params, sums, strict=True):
                    if p.grad is not None:
                        acc.add_(p.grad.float(), alpha=1.0 / scale)
                        p.grad = None
                seen += 1
                samples += _batch_size(batch)
        except Exception as exc:  # raised on every rank by group.sum
            failed = exc
        finally:
            phase.close()
    if group.distributed and shard:
        counts = group.sum(torch.tensor([float(seen), float(samples)], device=params[0].device), failed)
        seen_total, samples_total = int(counts[0]), int(counts[1])
        flat = group.sum(torch.cat([s.flatten() for s in sums]))
        offset = 0
        for s in sums:
            s.copy_(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
    else:  # one process, or every rank read the whole (unshardable) loader: rank 0's result is broadcast below
        group.sum(torch.zeros(1, device=params[0].device), failed)
        seen_total, samples_total = seen, samples
    if seen_total == 0:
        raise ValueError("the general-data loader yielded no batch: DBA needs general data to estimate its gradient.")
    bad = [n for (n, _), s in zip(named, sums, strict=True) if not torch.isfinite(s).all()]
    if bad:
        raise FloatingPointError(
            f"the global gradient is not finite for {bad[:3]}{'...' if len(bad) > 3 else ''}: check the general data"
            " and the loss (under 16-mixed, fp16 overflow)."
        )
    dense = {n: s / seen_total for (n, _), s in zip(named, sums, strict=True)}
    out = _compress(dense, rank)
    out.batches, out.samples = seen_total, samples_total
    if group.distributed:
        _broadcast_(out)
    return out


def _broadcast_(ghat: GlobalGradient) -> None:
    """Every rank gets rank 0's tensors (an SVD may differ in the last bits between devices)."""
    import torch.distributed as dist

    for tensor in ghat.tensors():
        dist.broadcast(tensor, src=0)


# --- the boost and the correction -------------------------------------------------------------------------------------


def resolve_k0(k0: float | str, total_steps: int) -> float:
    """``k0`` as a number: ``"auto"`` is ``200 / total_steps`` (the reviews' best value, unverified)."""
    if k0 == "auto":
        return K0_STEPS / max(1, total_steps)
    if isinstance(k0, bool) or not isinstance(k0, (int, float)) or k0 < 0:
        raise ValueError(f'`k0` must be "auto" or a number >= 0, got {k0!r}.')
    return float(k0)


def boost_coefficient(step: int, total_steps: int, k0: float, decay: Decay = "linear") -> float:
    """``k_t`` at optimizer step ``step`` (0-based) of ``total_steps``: ``"linear"``: ``k0 * max(0, 1 - t / T)``
    (reconstruction; the paper's decay is unknown); ``"constant"``: ``k0``."""
    if decay == "constant":
        return k0
    if decay == "linear":
        return k0 * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f'`decay` must be "linear" or "constant", got {decay!r}.')


@dataclass(frozen=True)
class LinearCorrection:
    """The dynamic correction ``c = clip(1 + gamma * (1 - cos), c_min, c_max)`` (reconstruction: the paper's Eq. 9
    is not available; a reviewer says it "potentially increas[es] step size when gradients differ"). ``gamma=0``
    turns it off (``c = 1``)."""

    gamma: float = 0.5
    c_min: float = 0.5
    c_max: float = 2.0

    def __post_init__(self) -> None:
        for name in ("gamma", "c_min", "c_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if not 0 < self.c_min <= self.c_max:
            raise ValueError(f"need 0 < `c_min` <= `c_max`, got c_min={self.c_min!r}, c_max={self.c_max!r}.")

    def __call__(self, cos: Tensor) -> Tensor:
        return (1.0 + self.gamma * (1.0 - cos)).clamp(self.c_min, self.c_max)


def boost_gradients_(
    named_params: Iterable[tuple[str, nn.Parameter]],
    ghat: GlobalGradient,
    k: float,
    correction: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DBA step on the gradients in place: ``p.grad = c * (p.grad + k * ghat[p])`` with ``c = correction(cos)``,
    ``cos`` the cosine between the domain gradient (before the boost) and ``ghat`` over the parameters that have a
    gradient and an entry in ``ghat``. Returns ``(cos, c)`` as tensors (no host sync)."""
    pairs = [(n, p.grad) for n, p in named_params if p.grad is not None and n in ghat.shapes]
    if not pairs:
        raise ValueError("no parameter with a gradient is covered by the global gradient (parameter names differ?).")
    cos = ghat.cosine(dict(pairs))
    c = correction(cos) if correction is not None else torch.ones_like(cos)
    for name, grad in pairs:
        if k:
            ghat.add_to_(name, grad, k)
        if correction is not None:
            grad.mul_(c.to(grad.dtype))
    return cos, c


# --- annealing --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnealingSchedule:
    """A learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up from ``1 / warmup_steps``
    to 1 over ``warmup_steps``, then cosine annealing to ``floor`` at ``total_steps`` (DBA's "annealing learning":
    a small initial rate and a decay; the paper's schedule and values are unknown, this shape is ours). Picklable, so
    the scheduler's state checkpoints.

    Example::

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-4)
            total = self.trainer.estimated_stepping_batches
            sched = LambdaLR(opt, AnnealingSchedule(total, warmup_steps=total // 20, floor=0.1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    """

    total_steps: int
    warmup_steps: int = 0
    floor: float = 0.1

    def __post_init__(self) -> None:
        check_int("total_steps", self.total_steps)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"`floor` must be in [0, 1], got {self.floor!r}.")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

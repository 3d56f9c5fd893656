"""The Lightning layer of Dynamic Boosted Annealing: :class:`DynamicBoostedAnnealing`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft._internal.logging import log_scalars
from lightning_ft._internal.resume import check_resumed_arguments
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.optim.dba import (
    Decay,
    GlobalGradient,
    LinearCorrection,
    Task,
    _check_task,
    boost_coefficient,
    boost_gradients_,
    estimate_global_gradient,
    resolve_k0,
)

__all__ = ["DynamicBoostedAnnealing"]

_HOOK = "general_dataloader"


class DynamicBoostedAnnealing(Callback):
    """Dynamic Boosted Annealing (Tang et al. 2025): fine-tune on domain data only, boosted by a general-data gradient
    estimated once at the starting weights.

    At the start of training (after the DDP wrap, before the first step) the mean training-loss gradient ``ghat`` of
    ``general_batches`` general batches is estimated at the starting weights
    (:func:`~lightning_ft.optim.estimate_global_gradient`: train mode, no optimizer step, parameters, buffers, ``.grad``
    and RNG untouched; under the Trainer's precision; a progress bar when the Trainer has one; under DDP each rank
    reads its shard and the gradients are all-reduced, so every rank holds the same ``ghat``). Then, in
    ``on_before_optimizer_step`` (gradients accumulated, all-reduced under DDP and unscaled under ``16-mixed``,
    before clipping), every step's gradient becomes ``c_t * (g_t + k_t * ghat)``:

    * ``k_t = k0 * (1 - t / T)`` (``decay="linear"``, reconstruction) or ``k0`` (``"constant"``), ``T`` the fit's
      optimizer steps (``total_steps`` or ``trainer.estimated_stepping_batches``), ``k0="auto"`` = ``200 / T`` (the
      value the reviews quote as the paper's best);
    * ``c_t = clip(1 + gamma * (1 - cos(g_t, ghat)), c_min, c_max)`` (reconstruction of the unpublished dynamic
      correction; off by default, ``gamma=0``: with ``gamma=0.5`` it cancelled the boost's benefit in our SGD effect
      test; ``correction=`` takes any ``cos -> c`` callable). Optimizers that normalise the gradient (Adam, AdamW)
      undo most of a scale of the whole gradient: ``c_t`` then changes little.

    Logs ``dba/k``, ``dba/cos`` and ``dba/c`` every step (through ``pl_module.log``: monitorable) and
    ``dba/ghat_norm``, ``dba/general_samples``, ``dba/estimate_seconds`` once. The annealing part of DBA is an ordinary
    LR scheduler in ``configure_optimizers`` (:class:`~lightning_ft.optim.AnnealingSchedule`).

    Where ``ghat`` comes from, first match: the checkpoint of a resumed fit (``ghat`` cannot be re-estimated once the
    weights moved); ``global_gradient``; the file ``global_gradient_path`` when it exists; else an estimate from
    ``general_dataloader`` or, when that is None, from a ``general_dataloader()`` method of the data module or the
    LightningModule (written to ``global_gradient_path`` when given, for reuse on other domains).

    The state (checkpointed) holds ``ghat`` (dense: one float32 copy of the trainable parameters; with ``rank`` its
    factors), the step and ``T``, so a resumed fit continues exactly, with the schedule of the fit it resumes.
    FSDP, DeepSpeed and model-parallel strategies are refused at ``setup`` (the gradients are sharded there).

    Args:
        general_dataloader: general-data batches (e.g. pre-training text), as the training loss consumes them.
        general_batches: how many general batches ``ghat`` averages (None: the whole loader).
        k0: the boost's initial weight, or ``"auto"`` (``200 / T``).
        decay: ``"linear"`` (``k_t = k0 (1 - t/T)``) or ``"constant"``.
        gamma, c_min, c_max: the dynamic correction (:class:`~lightning_ft.optim.LinearCorrection`).
        rank: store ``ghat`` of each parameter with 2 or more dimensions as a rank-``rank`` randomised SVD (the
            paper's compression, rank unknown); None: dense.
        global_gradient_path: a file of :meth:`GlobalGradient.save`: loaded when it exists, else written after the
            estimate (rank 0).
        global_gradient: a precomputed :class:`~lightning_ft.optim.GlobalGradient` (names as in
            ``pl_module.named_parameters()``).
        total_steps: ``T``; None: ``trainer.estimated_stepping_batches``.
        task: the loss of the estimate when the module has no ``lightning_ft_loss(batch)``: ``"causal_lm"``,
            ``"classification"`` or ``"auto"`` (see :func:`~lightning_ft.optim.batch_loss`).
        correction: a callable ``cos (0-dim tensor) -> c`` replacing the linear correction.
        progress_bar: show the estimate's progress bar (None: when the Trainer has one).

    Example::

        general = DataLoader(pretraining_chunks, batch_size=32, shuffle=True)
        trainer = Trainer(max_epochs=3, callbacks=[DynamicBoostedAnnealing(general, general_batches=64)])
        trainer.fit(model, domain_datamodule)

    Reference: Tang et al., "Dynamic Boosted Annealing", arXiv:2509.26242 (2025).
    """

    def __init__(
        self,
        general_dataloader: Iterable[Any] | None = None,
        general_batches: int | None = 32,
        k0: float | str = "auto",
        decay: Decay = "linear",
        gamma: float = 0.0,
        c_min: float = 0.5,
        c_max: float = 2.0,
        rank: int | None = None,
        global_gradient_path: str | None = None,
        global_gradient: GlobalGradient | None = None,
        total_steps: int | None = None,
        task: Task = "auto",
        correction: Callable[[Tensor], Tensor] | None = None,
        progress_bar: bool | None = None,
    ) -> None:
        super().__init__()
        check_int("general_batches", general_batches, allow_none=True)
        check_int("rank", rank, allow_none=True)
        check_int("total_steps", total_steps, allow_none=True)
        resolve_k0(k0, 1)
        if decay not in ("linear", "constant"):
            raise ValueError(f'`decay` must be "linear" or "constant", got {decay!r}.')
        _check_task(task)
        if global_gradient is not None and not isinstance(global_gradient, GlobalGradient):
            raise TypeError(
                f"`global_gradient` must be a GlobalGradient or None, got {type(global_gradient).__name__}."
            )
        if correction is not None and not callable(correction):
            raise TypeError(f"`correction` must be a callable cos -> c or None, got {type(correction).__name__}.")
        linear = LinearCorrection(gamma, c_min, c_max)  # checks gamma, c_min, c_max whatever is used
        # what scales the boosted gradient: `correction`, else the linear one, none at gamma = 0 (c = 1)
        self._correction = correction if correction is not None else (linear if gamma else None)
        self.general_dataloader, self.general_batches = general_dataloader, general_batches
        self.k0, self.decay, self.gamma, self.c_min, self.c_max = k0, decay, gamma, c_min, c_max
        self.rank, self.global_gradient_path, self.global_gradient = rank, global_gradient_path, global_gradient
        self.total_steps, self.task, self.correction, self.progress_bar = total_steps, task, correction, progress_bar
        self.ghat: GlobalGradient | None = None
        self.steps = 0
        self._total: int | None = None
        self._k0 = 0.0  # resolve_k0(k0, T), set at train start
        self._params: dict[int, list[tuple[str, nn.Parameter]]] = {}

    # --- set-up ----------------------------------------------------------------------------------------------------

    def _essential(self) -> dict[str, Any]:
        return {"general_batches": self.general_batches, "rank": self.rank, "task": self.task}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "DynamicBoostedAnnealing", "reads and edits whole gradients")
        if stage == "fit":  # a new fit starts afresh; a checkpoint's state is restored after setup
            self.ghat, self.steps, self._total, self._params = None, 0, None, {}

    def _total_steps(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        total = trainer.estimated_stepping_batches
        if not isinstance(total, int) and not (isinstance(total, float) and total < float("inf")):
            raise ValueError(
                "DynamicBoostedAnnealing's boost decays over the fit's optimizer steps, but the Trainer has no finite"
                " length (max_epochs=-1 and max_steps=-1): set `total_steps`, `max_steps` or `max_epochs`."
            )
        return max(1, int(total))

    def _loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        if self.general_dataloader is not None:
            return self.general_dataloader
        for owner in (trainer.datamodule, pl_module):
            method = getattr(owner, _HOOK, None)
            if callable(method):
                return method()
        raise ValueError(
            "DynamicBoostedAnnealing needs general data to estimate its global gradient: pass `general_dataloader=`,"
            " `global_gradient=` (a GlobalGradient) or `global_gradient_path=` (an existing file of"
            " GlobalGradient.save), or define a `general_dataloader()` method on the data module or the module."
        )

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> GlobalGradient:
        if self.global_gradient is not None:
            return self.global_gradient
        path = Path(self.global_gradient_path) if self.global_gradient_path else None
        if path is not None and path.exists():
            return GlobalGradient.load(path)
        start = time.perf_counter()
        ghat = estimate_global_gradient(
            pl_module,
            self._loader(trainer, pl_module),
            max_batches=self.general_batches,
            rank=self.rank,
            task=self.task,
            trainer=trainer,
            progress=self.progress_bar,
        )
        seconds = time.perf_counter() - start
        if path is not None:
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                ghat.save(path)
            trainer.strategy.barrier("dba_global_gradient_saved")
        log_scalars(trainer, {"dba/estimate_seconds": seconds})
        return ghat

    def _check_names(self, ghat: GlobalGradient, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        missing = [n for n in ghat.names if n not in params]
        wrong = [n for n in ghat.names if n in params and tuple(params[n].shape) != tuple(ghat.shapes[n])]
        if missing or wrong:
            raise ValueError(
                f"DynamicBoostedAnnealing: the global gradient does not fit {type(pl_module).__name__}: parameters"
                f" {missing[:3]} are not in the module, {wrong[:3]} have other shapes. It must come from the same base"
                " model, with names as in `pl_module.named_parameters()`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and any(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers):
            raise ValueError(
                "DynamicBoostedAnnealing adds the global gradient to unscaled gradients, but under 16-mixed this"
                " optimizer unscales inside its step (e.g. fused=True): use a non-fused optimizer or bf16-mixed."
            )
        if self.ghat is None:  # a fresh fit (a resumed one has the checkpoint's)
            self._total = self._total_steps(trainer)
            self.ghat = self._resolve(trainer, pl_module)
        self._check_names(self.ghat, pl_module)
        device = next(p.device for p in pl_module.parameters())
        self.ghat = self.ghat.to(device)
        assert self._total is not None
        self._k0 = resolve_k0(self.k0, self._total)
        log_scalars(
            trainer,
            {
                "dba/ghat_norm": self.ghat.norm(),
                "dba/general_samples": float(self.ghat.samples),
                "dba/k0": self._k0,
            },
        )

    # --- the boost -------------------------------------------------------------------------------------------------

    def _named(self, pl_module: pl.LightningModule, optimizer: Any) -> list[tuple[str, nn.Parameter]]:
        key = id(optimizer)
        if key not in self._params:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._params[key] = [(n, p) for n, p in pl_module.named_parameters() if id(p) in ids]
        return self._params[key]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.ghat is None or self._total is None:
            return  # outside a fit started by this callback (e.g. a tuner's trial fit)
        k = boost_coefficient(self.steps, self._total, self._k0, self.decay)
        cos, c = boost_gradients_(self._named(pl_module, optimizer), self.ghat, k, self._correction)
        self.steps += 1
        # the gradients are already identical on every rank (all-reduced): no sync needed
        pl_module.log("dba/k", k)
        pl_module.log("dba/cos", cos)
        pl_module.log("dba/c", c)

    # --- state -----------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.ghat is None:
            return {}
        return {
            "global_gradient": self.ghat.state_dict(),
            "steps": self.steps,
            "total_steps": self._total,
            "arguments": self._essential(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "global_gradient" not in state_dict:
            return
        check_resumed_arguments(
            self, state_dict.get("arguments"), self._essential(), "its global gradient was estimated with them"
        )
        self.ghat = GlobalGradient.from_state_dict(state_dict["global_gradient"])
        self.steps = int(state_dict.get("steps", 0))
        self._total = state_dict.get("total_steps")

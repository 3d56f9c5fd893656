"""``LearnedMaskPruning``: learn per-neuron channel masks jointly with fine-tuning, toward a target sparsity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft._internal.logging import log_histogram
from lightning_ft._internal.neurons import GATE_LAYER_TYPES
from lightning_ft._internal.resume import check_resumed_arguments, restore_legacy_state
from lightning_ft._internal.strategies import check_strategy
from lightning_ft._internal.validation import check_int
from lightning_ft.pruning.gates import (
    GATE_ATTR,
    GATE_TYPES,
    GatedLayer,
    attach_gates,
    ensure_gate_hooks,
    find_gates,
    fold_gates_into_state_dict,
    gate_penalty_grad,
    make_permanent,
    num_pruned,
    topk_keep_masks,
)
from lightning_ft.pruning.schedule import cubic_sparsity

__all__ = ["LearnedMaskPruning"]

DEFAULT_GATE_LR = {"sigmoid": 1e-2, "hard_concrete": 1e-1}  # emmental's mask-score learning rates
_GATES_CHANGED = "its gate scores and frozen masks do not fit this callback's gates and masks"


class LearnedMaskPruning(Callback):
    """Learn which output neurons (channels) to prune while fine-tuning, reaching ``sparsity`` on a cubic schedule.

    In ``setup`` every eligible layer gets a gate per output neuron (:func:`~lightning_ft.pruning.attach_gates`),
    before the optimizer and the DDP wrap exist, so DDP all-reduces the scores' gradients. The scores are trained by
    the callback's own Adam (learning rate ``gate_lr``, no weight decay) at each optimizer step of the fit; they are
    removed from the module's optimizer if ``configure_optimizers`` picked them up, so the weights' learning rate and
    schedule stay the user's. At each step the ``floor(s_t * n)`` lowest-scoring neurons are masked to zero, with
    ``s_t`` rising from 0 to ``sparsity`` between ``schedule_start`` and ``schedule_end`` (shares of the fit's
    optimizer steps); the mask is then frozen and the rest of the fit recovers accuracy. The regulariser
    ``penalty * s_t / sparsity * mean(density)`` (L1 on sigmoid, or expected L0) is added to the scores' gradient.
    At the end of the fit the masks are folded into the weights (``make_permanent``): the model has its original
    ``state_dict`` keys, with zeros in pruned channels; :func:`~lightning_ft.pruning.export` then removes them.

    Masks are computed from the scores, which are identical on every rank, by a deterministic top-k; the
    HardConcrete noise comes from the callback's seeded generator, which is checkpointed with the gate optimizer
    and the frozen masks, so a resumed fit continues the schedule with the same masks.

    Checkpoints written during the fit hold the model the user would get if the fit stopped there: the current
    gates are folded into the weights (``on_save_checkpoint``, as Lightning's ``ModelPruning`` does) and the gate
    keys are dropped, so ``load_from_checkpoint`` works on a freshly built module. The callback's own state keeps
    the gate scores and the original values of the folded output rows (only the rows whose gate is not 1), so
    ``ckpt_path=`` resumes exactly. Checkpoints with ``save_weights_only=True`` are the exception: Lightning does not
    call callbacks' ``on_save_checkpoint`` for them, and they keep the gate keys.

    A callback reused for a second ``fit`` starts afresh (schedule, frozen masks, noise generator, gate optimizer),
    unless that fit resumes from a checkpoint. The state is stored under the class name, so a resume finds it
    whatever ``penalty``, schedule or ``make_permanent`` arguments changed; ``sparsity``, ``gate_type``,
    ``layer_types``, ``include``, ``exclude``, ``scope`` and ``min_keep`` must stay the same (else ``ValueError``).
    The gates' forward hooks are checked again in ``on_fit_start``, after the strategy has set the model up:
    ``sync_batchnorm=True`` replaces the BatchNorms (keeping their ``neuron_gate``) and drops their hooks, which are
    then registered again. FSDP and DeepSpeed are refused at ``setup``.

    Args:
        sparsity: target share of gated neurons to prune, in [0, 1).
        gate_type: ``"sigmoid"`` (structured soft movement pruning: binary forward, straight-through scores, L1 on
            sigmoid) or ``"hard_concrete"`` (L0 gates).
        layer_types: gated layers, subset of ``("conv", "linear", "hf_conv1d", "bn")``. Conv nets: ``("bn",)``
            (the default; a gate on the BatchNorm output makes a pruned channel exactly zero). GPT-2's MLP:
            ``("hf_conv1d",)`` with ``include=(r"mlp\\.c_fc",)``.
        include, exclude: regular expressions on layer names. The classifier head (timm's ``get_classifier()``, HF's
            ``get_output_embeddings()``, else the model's last conv/linear layer) is never gated unless ``include``
            names it.
        scope: ``"layer"`` (prune the same share of every layer) or ``"global"`` (rank all neurons together).
        min_keep: neurons always kept per layer.
        schedule_start, schedule_end: where the sparsity starts rising and reaches its target, as shares of the
            fit's optimizer steps.
        penalty: weight of the gate regulariser at the target sparsity (0 disables it).
        gate_lr: Adam learning rate of the scores (default 1e-2 for sigmoid, 1e-1 for HardConcrete).
        init: initial score (default 0 for sigmoid; 3 for HardConcrete, whose eval gate is then 1).
        total_steps: optimizer steps the schedule spans (default ``trainer.estimated_stepping_batches``; needed
            when that is unknown, e.g. for an iterable dataset without ``max_steps``). A resumed fit keeps the
            checkpointed schedule's total unless this is given.
        make_permanent: fold the masks into the weights at the end of the fit and remove the gates.
        seed: seed of the HardConcrete noise.

    Example::

        trainer = Trainer(callbacks=[LearnedMaskPruning(sparsity=0.5)], max_epochs=10)
        trainer.fit(model, datamodule)
        small, report = export(model.net, example_input=torch.zeros(1, 3, 32, 32))

    References: Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020; Louizos,
    Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        gate_type: Literal["sigmoid", "hard_concrete"] = "sigmoid",
        layer_types: Sequence[str] = ("bn",),
        include: Sequence[str] = (),
        exclude: Sequence[str] = ("shortcut", "downsample"),
        scope: Literal["layer", "global"] = "layer",
        min_keep: int = 1,
        schedule_start: float = 0.1,
        schedule_end: float = 0.7,
        penalty: float = 1.0,
        gate_lr: float | None = None,
        init: float | None = None,
        total_steps: int | None = None,
        make_permanent: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
        if gate_type not in GATE_TYPES:
            raise ValueError(f"`gate_type` must be one of {GATE_TYPES}, got {gate_type!r}.")
        if not layer_types or set(layer_types) - set(GATE_LAYER_TYPES):
            raise ValueError(f"`layer_types` must be a non-empty subset of {GATE_LAYER_TYPES}, got {layer_types!r}.")
        if scope not in ("layer", "global"):
            raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}.")
        if not 0.0 <= schedule_start <= schedule_end <= 1.0:
            raise ValueError(f"need 0 <= schedule_start <= schedule_end <= 1, got {schedule_start} and {schedule_end}.")
        if not penalty >= 0:
            raise ValueError(f"`penalty` must be >= 0, got {penalty}.")
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"`gate_lr` must be > 0, got {gate_lr}.")
        check_int("min_keep", min_keep, minimum=0)
        check_int("total_steps", total_steps, allow_none=True)
        self.sparsity, self.gate_type = float(sparsity), gate_type
        self.layer_types, self.include, self.exclude = tuple(layer_types), tuple(include), tuple(exclude)
        self.scope, self.min_keep = scope, min_keep
        self.schedule_start, self.schedule_end = schedule_start, schedule_end
        self.penalty = penalty
        self.gate_lr = gate_lr
        self.init, self.total_steps, self.make_permanent, self.seed = init, total_steps, make_permanent, seed
        self.gated: list[GatedLayer] = []
        self._load_hook: Any = None
        self._reset()

    def _reset(self) -> None:
        """The state of a fresh fit (a checkpoint's state, if any, is loaded after this, in ``load_state_dict``)."""
        self.pruned: dict[str, int] = {}  # pruned neurons per layer, after make_permanent
        self.current_sparsity = 0.0  # the schedule's share of gated neurons masked now (computed on the host)
        self._total = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._frozen: list[Tensor] | None = None
        self._mask_step = -1
        self._pending: dict[str, Any] = {}
        self._gate_keys_missing = False  # the restored state dict had its gates folded (see setup)
        self._gates_restored = False

    @property
    @override
    def state_key(self) -> str:
        # the class name only: the state is found again whatever learning-rate, penalty or schedule arguments changed
        # on resume; the gates' and masks' arguments are checked in load_state_dict
        return self.__class__.__qualname__

    def _gate_arguments(self) -> dict[str, Any]:
        """The arguments that define the gates and their masks: a resume must keep them."""
        return {
            "sparsity": self.sparsity,
            "gate_type": self.gate_type,
            "layer_types": list(self.layer_types),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "scope": self.scope,
            "min_keep": self.min_keep,
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        # Lightning calls setup, then (resuming with ckpt_path) restores the module's weights and calls our
        # load_state_dict, then wraps the model (DDP, sync_batchnorm) and calls on_fit_start: reset here, so that a
        # reused callback starts afresh and a resumed one gets its checkpointed state
        self._reset()
        # before configure_optimizers and the DDP wrap, so both see the scores
        self.gated = find_gates(pl_module) or attach_gates(
            pl_module, self.layer_types, self.include, self.exclude, self.gate_type, self.init
        )
        for g in self.gated:
            if g.gate.gate_type != self.gate_type:
                raise ValueError(f"{g.name} already has a {g.gate.gate_type!r} gate, not {self.gate_type!r}.")
        self._remove_load_hook()
        # our checkpoints hold folded weights without gate keys: let Lightning's strict restore accept their absence
        # (the scores come back from this callback's state, in load_state_dict)
        callback = self  # a closure rather than a bound method: a deep copy of the module does not copy the callback

        def accept_folded(module: nn.Module, incompatible: Any) -> None:
            callback._accept_folded_state_dict(module, incompatible)

        self._load_hook = pl_module.register_load_state_dict_post_hook(accept_folded)

    def _accept_folded_state_dict(self, module: nn.Module, incompatible: Any) -> None:
        gate_keys = {f"{g.name}.{GATE_ATTR}.{k}" for g in self.gated for k in g.gate.state_dict()}
        missing = [k for k in incompatible.missing_keys if k in gate_keys]
        if gate_keys and len(missing) == len(gate_keys):  # all of them: a folded checkpoint (some: a real mismatch)
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in gate_keys]
            self._gate_keys_missing = True

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()

    def _gates(self) -> list:
        return [g.gate for g in self.gated]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        if not pl_module.automatic_optimization:
            raise ValueError(
                "LearnedMaskPruning steps the gate scores with automatic optimization's optimizer step; manual"
                " optimization is not supported."
            )
        # the strategy may have replaced gated modules (sync_batchnorm=True converts the BatchNorms: the gate child
        # is carried over, the forward hook is not); find the gates again and re-register lost hooks
        gated = ensure_gate_hooks(pl_module)
        if [g.gate for g in gated] != [g.gate for g in self.gated]:
            raise RuntimeError(
                f"LearnedMaskPruning: the strategy {type(trainer.strategy).__name__} replaced gated layers without"
                f" their gates (gated before its setup: {[g.name for g in self.gated]}, after:"
                f" {[g.name for g in gated]})."
            )
        self.gated = gated
        if self._gate_keys_missing and not self._gates_restored:
            rank_zero_warn(
                "LearnedMaskPruning: the checkpoint's weights have the gates folded in, but the checkpoint holds no"
                f" state for this callback (state_key {self.state_key!r}); the gates start afresh on the folded"
                " weights."
            )
        # an explicit total, else the resumed schedule's, else the fit's
        total = self.total_steps or self._pending.pop("total", None) or trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the fit's number of optimizer steps is unknown ({total}); pass `total_steps=` to LearnedMaskPruning."
            )
        self._total = int(total)
        scores = [g.scores for g in self._gates()]
        ids = {id(p) for p in scores}
        for optimizer in trainer.optimizers:  # the scores train with their own optimizer and learning rate
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            for p in scores:  # state created in __init__ (e.g. Adagrad) would break optimizer.state_dict()
                optimizer.state.pop(p, None)
        lr = DEFAULT_GATE_LR[self.gate_type] if self.gate_lr is None else self.gate_lr
        self._optimizer = torch.optim.Adam(scores, lr=lr)
        if "optimizer" in self._pending:
            self._optimizer.load_state_dict(self._pending.pop("optimizer"))
            for group in self._optimizer.param_groups:  # the checkpoint's moments, this fit's learning rate
                group["lr"] = lr
        self._mask_step = -1

    def target_sparsity(self, step: int) -> float:
        """The scheduled sparsity at optimizer step ``step``."""
        return cubic_sparsity(step, self._total, self.sparsity, self.schedule_start, self.schedule_end)

    def _update_masks(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == self._mask_step or not self.gated:
            return
        self._mask_step = step
        gates = self._gates()
        sizes = [g.num_neurons for g in gates]
        if self._frozen is not None:
            masks: list[Tensor] | None = self._frozen
        else:
            target = self.target_sparsity(step)
            masks = None
            if target > 0:
                masks = topk_keep_masks([g.scores for g in gates], target, self.scope, self.min_keep)
                if step >= self.schedule_end * self._total:
                    self._frozen = masks
            self.current_sparsity = num_pruned(sizes, target, self.scope, self.min_keep) / sum(sizes)
        for gate, mask in zip(gates, masks or [None] * len(gates), strict=True):
            gate.mask = None if mask is None else mask.to(gate.scores.device)

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_masks(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_masks(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update_masks(trainer)
        if self.gate_type == "hard_concrete":
            gates = self._gates()
            noise = torch.rand(sum(g.num_neurons for g in gates), generator=self._generator)
            noise = noise.to(gates[0].scores.device, non_blocking=True)
            for gate, u in zip(gates, noise.split([g.num_neurons for g in gates]), strict=True):
                gate.noise = u

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._optimizer is None:
            return
        gates = self._gates()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP: Lightning unscaled only the module's optimizer
            inv = 1.0 / scaler.get_scale()
            for g in gates:
                if g.scores.grad is not None:
                    g.scores.grad.mul_(inv)
        target = self.target_sparsity(trainer.global_step)
        weight = self.penalty * (target / self.sparsity if self.sparsity > 0 else 0.0)
        if weight > 0:
            for g, grad in zip(gates, gate_penalty_grad(gates), strict=True):
                if g.scores.grad is None:
                    g.scores.grad = torch.zeros_like(g.scores)
                g.scores.grad.add_(grad, alpha=weight)
        if scaler is not None:
            grads = [g.scores.grad for g in gates if g.scores.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(x).all() for x in grads]).all()):
                self._optimizer.zero_grad(set_to_none=True)  # the scaler skips this step: so do the scores
                return
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.gated:
            return
        gates = self._gates()
        density = torch.cat([g.density().detach() for g in gates]).mean()
        # measured on the gates (masked, or a HardConcrete gate closed at 0), as a tensor: no device sync here
        measured = torch.cat([g.pruned() for g in gates]).float().mean()
        values = {
            "prune/sparsity": measured,
            # the step whose masks this batch used (global_step has already moved past it)
            "prune/target_sparsity": self.target_sparsity(self._mask_step),
            "prune/gate_density": density,
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gated:
            log_histogram(trainer, "prune/gate_scores", torch.cat([g.scores.detach() for g in self._gates()]))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.make_permanent or not self.gated:
            return
        if self._frozen is None and self.sparsity > 0:
            rank_zero_warn(
                f"LearnedMaskPruning: the fit ended before the schedule reached its target sparsity {self.sparsity}"
                f" (now {self.current_sparsity:.3f}); the current masks are made permanent."
            )
        total = sum(g.num_neurons for g in self.gated)
        self.pruned = make_permanent(pl_module)  # finds the gates in the module's current layers
        self.gated, self._optimizer = [], None
        rank_zero_info(
            f"LearnedMaskPruning: pruned {sum(self.pruned.values())} of {total} neurons in {len(self.pruned)} layers."
        )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.gated and "state_dict" in checkpoint:
            # the model the user would get if the fit stopped here, loadable into a fresh module; state_dict() below
            # keeps what resuming needs
            checkpoint["state_dict"] = fold_gates_into_state_dict(checkpoint["state_dict"], self.gated)

    @torch.no_grad()
    def _unfolded_rows(self) -> dict[str, dict[str, Tensor]]:
        """The original values of the output rows that folding changes (gate value not 1), per gated layer."""
        rows = {}
        for g in self.gated:
            index = (g.gate.eval_value() != 1).nonzero().flatten()
            if not index.numel():
                continue
            weight = g.module.weight
            entry = {"index": index.cpu(), "weight": weight.index_select(g.out_dim, index.to(weight.device)).cpu()}
            bias = getattr(g.module, "bias", None)
            if isinstance(bias, Tensor):
                entry["bias"] = bias[index.to(bias.device)].cpu()
            rows[g.name] = entry
        return rows

    @torch.no_grad()
    def _restore_gates(self, scores: dict[str, Tensor], rows: dict[str, dict[str, Tensor]]) -> None:
        gated = {g.name: g for g in self.gated}
        if set(scores) != set(gated) or any(scores[n].shape != gated[n].gate.scores.shape for n in scores):
            raise ValueError(
                f"the checkpoint's LearnedMaskPruning state gates {sorted(scores)}, this fit gates {sorted(gated)}"
                " (or with other sizes): resume with the same model and the same layer_types/include/exclude."
            )
        for name, value in scores.items():
            gated[name].gate.scores.copy_(value)
        for name, entry in rows.items():  # the checkpoint's weights are folded: put the original rows back
            g = gated[name]
            weight = g.module.weight
            weight.index_copy_(g.out_dim, entry["index"].to(weight.device), entry["weight"].to(weight))
            if "bias" in entry:
                g.module.bias[entry["index"].to(weight.device)] = entry["bias"].to(g.module.bias)
        self._gates_restored = True

    @override
    def state_dict(self) -> dict[str, Any]:
        optimizer = self._optimizer.state_dict() if self._optimizer is not None else self._pending.get("optimizer")
        state = {
            "optimizer": optimizer,
            "frozen": None if self._frozen is None else [m.cpu() for m in self._frozen],
            "generator": self._generator.get_state(),
            "current_sparsity": self.current_sparsity,
            "total": self._total or self._pending.get("total"),
            "arguments": self._gate_arguments(),
        }
        if self.gated:  # mid-fit: checkpoints hold folded weights without the gates (on_save_checkpoint)
            state["scores"] = {g.name: g.gate.scores.detach().cpu().clone() for g in self.gated}
            state["unfolded"] = self._unfolded_rows()
        return state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written when the key held sparsity and gate_type: load the state from there
        restore_legacy_state(self, checkpoint, self._gate_arguments(), _GATES_CHANGED)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a state without "arguments" comes from an older checkpoint: accepted
        check_resumed_arguments(self, state_dict.get("arguments"), self._gate_arguments(), _GATES_CHANGED)
        if state_dict.get("optimizer") is not None:
            self._pending["optimizer"] = state_dict["optimizer"]  # applied when the gate optimizer is built
        frozen = state_dict.get("frozen")
        self._frozen = None if frozen is None else list(frozen)
        if state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
        self.current_sparsity = state_dict.get("current_sparsity", 0.0)
        if state_dict.get("total"):
            self._pending["total"] = state_dict["total"]
        # called after setup (gates attached) and after the module's weights were restored
        if state_dict.get("scores") is not None and self.gated:
            self._restore_gates(state_dict["scores"], state_dict.get("unfolded") or {})

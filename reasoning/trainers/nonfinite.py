"""Skip whole optimizer steps whose loss is NaN/inf, for every trainer of the package.

transformers.Trainer only keeps a NaN out of the *logged* loss (`logging_nan_inf_filter`): backward
still writes NaN into the accumulated gradients and the optimizer step spreads it into every weight.
`NonFiniteLossGuard`, mixed into every trainer (like `ResumableTrainer`), makes such a step a no-op:

1. `skip_nonfinite_loss` (called by the trainer's `compute_loss` on each training micro-batch): when
   the loss is NaN/inf on any rank (one all-reduce of a flag, so all ranks decide together), the
   loss is replaced by Σ 0·θ over the trainable parameters: backward then adds exactly 0 to every
   gradient (every parameter still takes part, which keeps DDP/ZeRO reductions in step), and the
   current optimizer step (`state.global_step`) is marked as skipped;
2. `create_optimizer` wraps the optimizer's `step`: for a marked step it only clears the gradients
   (those of the window's finite micro-batches too), so no parameter and no optimizer state moves
   (AdamW's step counter and moments stay as they were). transformers' loop calls it as
   `optimizer.step()` (accelerate's `AcceleratedOptimizer.step` forwards to it), then
   `lr_scheduler.step()`, then `model.zero_grad()`; DeepSpeed's ZeRO optimizers call the wrapped
   optimizer's `step` (once per parameter group/partition; every call of a marked step is skipped).

The learning-rate scheduler still advances on a skipped step: the schedule stays a function of
`global_step` (warm-up and decay end at `max_steps` as configured), as if the step had a zero
gradient. After more than `max_nonfinite_losses` skipped steps in a row, `NonFiniteLossError` stops
training. The metric `train/nonfinite_loss_skipped` is the number of skipped optimizer steps since
the previous log (the same on every rank).
"""

from __future__ import annotations

import types
from dataclasses import field
from typing import Any

import torch


def max_nonfinite_losses_field() -> Any:
    """The `max_nonfinite_losses` field of every trainer's config (one default, one help text)."""
    return field(
        default=3,
        metadata={
            "help": "An optimizer step in which any micro-batch's loss is NaN/inf is skipped whole (no "
            "weight or optimizer-state change; metric train/nonfinite_loss_skipped); training stops with an "
            "error after more than this many skipped steps in a row."
        },
    )


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf in more optimizer steps in a row than `max_nonfinite_losses` allows."""


class NonFiniteLossGuard:
    """Mixin for transformers.Trainer subclasses (before Trainer in the bases): see the module docstring.

    The subclass calls `skip_nonfinite_loss(model, loss)` in `compute_loss` while training, and sets
    `max_nonfinite_losses` (an attribute or a property reading its config).
    """

    max_nonfinite_losses: int = 3
    # the global step whose optimizer step is skipped (None: none yet)
    _nonfinite_step: int | None = None
    # skipped optimizer steps in a row, ending at `_nonfinite_step`
    _nonfinite_in_row = 0
    # skipped optimizer steps since the last log
    _nonfinite_skipped = 0

    def skip_nonfinite_loss(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, or when it is NaN/inf on any rank a zero-gradient stand-in Σ 0·θ, and the current
        optimizer step is skipped whole. Raises `NonFiniteLossError` when more than
        `max_nonfinite_losses` optimizer steps in a row were skipped."""
        bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad:
            return loss
        step = self.state.global_step
        if self._nonfinite_step != step:  # the first non-finite micro-batch of this optimizer step
            follows = self._nonfinite_step is not None and self._nonfinite_step == step - 1
            self._nonfinite_in_row = self._nonfinite_in_row + 1 if follows else 1
            self._nonfinite_step = step
            self._nonfinite_skipped += 1
            if self._nonfinite_in_row > self.max_nonfinite_losses:
                raise NonFiniteLossError(
                    f"the loss was NaN/inf (here {loss.item()}) in {self._nonfinite_in_row} optimizer steps in "
                    f"a row (up to step {step}); training stopped, checkpoints so far are kept. Lower the "
                    "learning rate, check the rewards and the data, or raise max_nonfinite_losses in the "
                    "trainer's recipe section."
                )
        return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer, whose `step` does nothing but clear the gradients during an
        optimizer step that `skip_nonfinite_loss` marked."""
        optimizer = super().create_optimizer(model)
        if getattr(optimizer.step, "skips_nonfinite_steps", False):
            return optimizer
        step = optimizer.step  # the class's step, with its hooks (e.g. GFlowNet's head-gradient reduce)
        trainer = self

        def guarded_step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if trainer._nonfinite_step == trainer.state.global_step:
                opt.zero_grad(set_to_none=True)  # parameters outside the model (heads) keep none either
                return None
            return step(*args, **kwargs)

        guarded_step.skips_nonfinite_steps = True  # type: ignore[attr-defined]
        # A bound method, not a plain function: torch's LR schedulers re-bind `optimizer.step.__func__`.
        optimizer.step = types.MethodType(guarded_step, optimizer)
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (not evaluation, not the end-of-training summary)
            logs = {**logs, "train/nonfinite_loss_skipped": float(self._nonfinite_skipped)}
            self._nonfinite_skipped = 0
        super().log(logs, start_time)

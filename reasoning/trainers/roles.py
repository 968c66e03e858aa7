"""Model roles beside the policy, for `RolloutTrainer`: frozen models and side parameters.

- `FrozenModel`: a frozen reference / base model — a copy of the starting policy (under DeepSpeed
  ZeRO-3 a partitioned inference engine, `RolloutTrainer.policy_copy`), the policy itself with its
  LoRA adapter disabled, or a model the caller passed. `logprobs(batch)` scores completions at the
  trainer's scoring warpers without a graph; `answer_logprobs(layouts)` scores reference answers;
  `scope()` yields the module to call (eval mode, adapter disabled) for anything else.
- `SideParameters`: parameters outside the policy with a learning rate of their own (GFlowNet's
  log Z / flow heads, a variational posterior q_φ). Their gradients are averaged over the ranks
  before each step and their state (weights, and an optimizer of their own) is saved in the
  checkpoints. `step="policy"`: stepped with every optimizer step of the policy (a group of the
  policy's optimizer at `lr`, following its schedule; under DeepSpeed, whose optimizer holds only
  the engine's parameters, an optimizer of the Trainer's class stepped right after the engine's,
  at `lr` × the schedule's factor λ(step)). `step="manual"`: an optimizer of their own (AdamW by
  default) that the trainer steps with `step()` when its algorithm says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import TrainerCallback

from reasoning.data.templates import ScoringIds
from reasoning.models.scoring import AnswerLogprobs, answer_logprobs, no_grad_chunks

if TYPE_CHECKING:
    from reasoning.trainers.base import RolloutTrainer


class FrozenModel:
    """A frozen model role (see the module docstring). `module` is the model called; `adapter`: the
    policy's PEFT model, run with its adapter disabled (the frozen base W without ΔW)."""

    def __init__(
        self,
        module: torch.nn.Module,
        scorer: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor],
        rows: int,
        adapter: bool = False,
    ) -> None:
        self.module, self.adapter, self._scorer, self._rows = module, adapter, scorer, rows
        if not adapter:
            module.eval()  # (a DeepSpeed engine's eval() returns None)
            module.requires_grad_(False)

    @contextlib.contextmanager
    def scope(self) -> Iterator[torch.nn.Module]:
        """The module to call, in eval mode (and with the adapter disabled for the policy's base)."""
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.disable_adapter() if self.adapter else contextlib.nullcontext():
                yield self.module
        finally:
            self.module.train(was_training)

    def logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token log-probs `[B, T]` of the batch's completions (CPU, no graph), at the trainer's
        scoring warpers (`RolloutTrainer.policy_logprobs`), `rows` rows per forward."""
        with self.scope() as module:
            return no_grad_chunks(lambda part: self._scorer(module, part), batch, self._rows)

    def answer_logprobs(
        self, layouts: Sequence[ScoringIds], pad_id: int = 0, batch_size: int = 64, with_trace: bool = False
    ) -> AnswerLogprobs:
        """`models.scoring.answer_logprobs` under this model."""
        with self.scope() as module:
            return answer_logprobs(
                module, layouts, pad_id=pad_id, batch_size=batch_size, with_trace=with_trace
            )

    def named_parameters(self, *args: Any, **kwargs: Any):
        return self.module.named_parameters(*args, **kwargs)

    def parameters(self, *args: Any, **kwargs: Any):
        return self.module.parameters(*args, **kwargs)


class SideParameters:
    """Parameters outside the policy with their own learning rate (see the module docstring)."""

    def __init__(
        self,
        trainer: RolloutTrainer,
        name: str,
        module: torch.nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        step: Literal["policy", "manual"] = "policy",
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        max_grad_norm: float | None = None,
        save_module: bool = True,
    ) -> None:
        if step not in ("policy", "manual"):
            raise ValueError(f'side parameters {name!r}: step must be "policy" or "manual", got {step!r}')
        self.trainer, self.name, self.module, self.lr = trainer, name, module, lr
        self.weight_decay, self.mode, self.max_grad_norm, self.save_module = (
            weight_decay,
            step,
            max_grad_norm,
            save_module,
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0  # manual steps taken
        self._pending: dict[str, Any] | None = None  # optimizer state restored before it exists
        if step == "manual":
            cls = optimizer_cls or torch.optim.AdamW
            self.optimizer = cls(
                self.parameters(), lr=lr, weight_decay=weight_decay, **(optimizer_kwargs or {})
            )

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ gradients and steps
    def reduce_gradients(self) -> None:
        """Average the gradients over the ranks (a missing gradient counts as 0). Every rank calls this."""
        accelerator = self.trainer.accelerator
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if accelerator.num_processes > 1:
                p.grad = accelerator.reduce(p.grad, reduction="mean")

    def step(self) -> float | None:
        """A manual step: average the gradients over the ranks, clip them to `max_grad_norm`, step, zero
        them. Returns the gradient norm before clipping (None without clipping)."""
        if self.optimizer is None:
            raise RuntimeError(f"side parameters {self.name!r} are stepped with the policy, not by hand")
        self.reduce_gradients()
        norm = None
        if self.max_grad_norm is not None and self.parameters():
            norm = float(torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return norm

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """For `step="policy"`: join the policy's optimizer (or, under DeepSpeed, get one of the Trainer's
        class, stepped after the engine's step). Called from `RolloutTrainer.create_optimizer`."""
        params = self.parameters()
        if self.mode != "policy" or not params:
            return
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            if self.optimizer is None:
                cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
                self.optimizer = cls(params, **{**kwargs, "lr": self.lr, "weight_decay": self.weight_decay})
                if self._pending is not None:
                    self.optimizer.load_state_dict(self._pending)
                trainer.add_callback(_StepAfterPolicy(self))
            return
        if any(group.get("side") == self.name for group in optimizer.param_groups):
            return
        optimizer.add_param_group(
            {"params": params, "lr": self.lr, "weight_decay": self.weight_decay, "side": self.name}
        )
        optimizer.register_step_pre_hook(lambda *_: self.reduce_gradients())
        optimizer.register_step_post_hook(lambda *_: self.module.zero_grad(set_to_none=True))

    def param_group(self) -> dict[str, Any] | None:
        """The optimizer group of these parameters (None before the optimizer exists)."""
        if self.optimizer is not None:
            return self.optimizer.param_groups[0]
        optimizer = self.trainer.optimizer
        if optimizer is None:
            return None
        return next((g for g in optimizer.param_groups if g.get("side") == self.name), None)

    def step_after_policy(self) -> None:
        """Under DeepSpeed: one step at `lr` × λ(k), the policy schedule's factor for this step k (what a
        group under the Trainer's LambdaLR gets; DeepSpeed steps the scheduler inside its engine step,
        before this runs). A step the non-finite guard skipped only clears the gradients."""
        trainer = self.trainer
        if trainer._nonfinite_step == trainer.state.global_step:
            self.module.zero_grad(set_to_none=True)
            return
        self.reduce_gradients()
        scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # accelerate's wrapper
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas:
            raise ValueError(
                f"lr_scheduler_type {trainer.args.lr_scheduler_type!r} is not a LambdaLR schedule; under "
                f"DeepSpeed the side parameters {self.name!r} follow the model's schedule through its "
                "λ(step): use linear, cosine, constant or another transformers LambdaLR schedule"
            )
        factor = lambdas[0](trainer.state.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor
        self.optimizer.step()
        self.module.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps}
        if self.save_module:
            state["module"] = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        if self.optimizer is not None:  # a group of the policy's optimizer is in transformers' optimizer.pt
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "module" in state:
            self.module.load_state_dict(state["module"])
        self.steps = int(state.get("steps", 0))
        if "optimizer" in state:
            if self.optimizer is None:  # created with the policy's optimizer, after this, in `train`
                self._pending = state["optimizer"]
            else:
                self.optimizer.load_state_dict(state["optimizer"])


class _StepAfterPolicy(TrainerCallback):
    def __init__(self, side: SideParameters) -> None:
        self.side = side

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.side.step_after_policy()

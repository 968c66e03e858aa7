"""GFlowNet fine-tuning of reasoning: TB with a learned log Z, SubTB(λ), DB, modified SubTB.

Generation is a tree-structured GFlowNet (methods/gflownet.md): states are prefixes s_k of the
completion, P_B = 1, and a terminal object is a trajectory followed by the stop action ⊤. With
`terminal: eos` the trajectory is the whole completion and ⊤ is EOS; with `terminal: answer` the
trajectory is the trace (the tokens before the template's answer marker) and ⊤ is the marker's
first token, as in Hu et al. where the answer is appended by the reward. The policy's log P_F is
always computed at temperature 1, whatever the behaviour policy's sampling temperature.

Losses (from `reasoning.objectives.gflownet`, mean over the micro-batch's rows):
- `tb`: (log Z(x) + Σ_t log P_F(s_{t+1}|s_t) − log R(x⊤)/T_R)², log Z a learned scalar or a small
  MLP on the prompt's last hidden state (`log_z: prompt`), in its own optimizer group (`log_z_lr`).
- `subtb` / `db`: SubTB(λ) / mean DB with log F(s_k) from a small MLP head on the (detached)
  hidden state after s_k, log F(x⊤) = log R(x⊤)/T_R at the terminal state.
- `modified_subtb` (Hu et al.): every prefix is terminable, F(s_k) = R(s_k⊤)/P_F(⊤|s_k): no flow
  head and no log Z; needs the log-reward of every prefix, log R(s_k⊤) (`prefix_reward_stride` > 1
  computes it every few tokens and interpolates linearly in between, as LaCoT does).
SubTB and modified SubTB weigh their pairs by λ^{j−i−1}, normalised (`subtb_normalization`) per
sequence (`sequence`, torchgfn's geometric_within; the default for `subtb`) or over each prompt's
samples (`gfn-lm-tuning`, Hu et al.'s code, where one batch is one prompt's samples; the default for
`modified_subtb`): the divisor is the mean pair weight of the prompt's group, computed when the
generation batch is built, so the mean over a group's rows is the reference's batch loss whichever
micro-batches the rows land in.

Rewards, untempered log R, then divided by the reward temperature T_R (annealed from
`reward_temperature_start` to `reward_temperature_end` linearly or by a cosine):
- `verifier`: log max(r, `reward_floor`) with r the recipe's reward functions (e.g. correctness);
- `likelihood`: log p_base(y* | x, z) of the known answer appended after the trace z (at a token
  boundary, `templates.scoring_ids`) under the frozen base model (a frozen copy, or the PEFT model
  with its adapters disabled);
- `product`: the sum of both logs (task reward × base likelihood).
With `base_prior` the frozen base's own probability of the terminal object is added,
log p_base(s_k⊤ | x) = Σ_{t<k} log p_base(z_{t+1} | s_t) + log p_base(⊤ | s_k): the target becomes
the base model conditioned on the reward, p_base(x⊤)·R(x) (with `likelihood`: Hu et al.'s
p_base(X z Y), the posterior over traces given the answer; with `verifier`: the base restricted
to correct solutions, which keeps the base's diversity among them).
An illegal-token penalty subtracts `illegal_token_penalty` per generated token containing a
character outside `allowed_characters`. Completions that never reach ⊤ (truncated, or no answer
marker with `terminal: answer`) get `truncated_log_reward` (default log `reward_floor`) in TB/SubTB/DB.

Exploration: each generation is on-policy (the rollout temperature), tempered (temperature drawn
uniformly from `temperature_range`, probability `tempered_probability`) or replayed (probability
`replay_probability`): prompts are drawn from a per-prompt replay buffer of the top
`replay_capacity` completions by untempered log-reward, deduplicated exactly and by normalised
edit distance (`replay_edit_distance`), re-tempered with the current T_R when reused, and saved in
checkpoints with the log Z / flow heads.

Metrics: `gfn/log_z`, `loss`, `gfn/var_logr_minus_logpf` (per-prompt Var(log R − log P_F), 0 for a
calibrated sampler), `gfn/log_reward`, `reward` (the task reward), `gfn/accuracy`,
`diversity/distinct_correct` (distinct correct answers per prompt), `diversity/pairwise`
(1 − mean pairwise similarity of a prompt's completions), replay and temperature statistics.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from reasoning.data.templates import encode, scoring_ids
from reasoning.eval.scaling import distinct_correct, find_first, pairwise_diversity
from reasoning.models.scoring import final_states, span_token_logprobs, states_token_logprobs
from reasoning.objectives.gflownet import (
    NORMALIZATIONS,
    detailed_balance,
    modified_subtrajectory_balance,
    set_terminal_log_flow,
    subtb_log_normalizer,
    subtrajectory_balance,
    trajectory_balance,
)
from reasoning.rewards.verifier import is_correct
from reasoning.rollout import Rollout, Sampling
from reasoning.trainers.base import RolloutTrainer, RolloutTrainerConfig

LOSSES = ("tb", "subtb", "db", "modified_subtb")
REWARDS = ("verifier", "likelihood", "product")
TERMINALS = ("eos", "answer")
SCHEDULES = ("constant", "linear", "cosine")
LOG_Z_KINDS = ("scalar", "prompt")
LIKELIHOOD_MODELS = ("auto", "frozen_copy", "disable_adapter")


@dataclass
class GFlowNetConfig(RolloutTrainerConfig):
    """The `gflownet:` section of a recipe."""

    loss: str = field(default="tb", metadata={"help": "tb, subtb, db or modified_subtb."})
    log_z: str = field(
        default="scalar",
        metadata={"help": "TB's log Z: scalar, or prompt (MLP on the prompt's last hidden state)."},
    )
    log_z_init: float = field(
        default=0.0, metadata={"help": "Initial value of log Z (the head's output bias)."}
    )
    log_z_lr: float = field(
        default=0.05,
        metadata={"help": "Learning rate of the log Z / flow heads (their own optimizer group)."},
    )
    head_hidden_size: int = field(
        default=64, metadata={"help": "Hidden width of the log Z and flow MLP heads."}
    )
    subtb_lambda: float = field(default=1.0, metadata={"help": "λ of SubTB(λ) and modified SubTB (λ ≥ 0)."})
    subtb_normalization: str | None = field(
        default=None,
        metadata={
            "help": "SubTB pair weights normalised per sequence (sequence: torchgfn's geometric_within) or "
            "over each prompt's samples (gfn-lm-tuning: Hu et al.'s code, each sequence weighs by its pairs). "
            "Default: gfn-lm-tuning for modified_subtb, sequence for subtb."
        },
    )
    terminal: str = field(
        default="eos",
        metadata={
            "help": "eos: trajectory = completion, ⊤ = EOS; answer: trajectory = trace, ⊤ = answer marker."
        },
    )
    reward: str = field(default="verifier", metadata={"help": "verifier, likelihood or product."})
    reward_floor: float = field(
        default=1e-4, metadata={"help": "Task rewards are clamped below at this value before the log."}
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Dataset column with the known answer y*."}
    )
    likelihood_model: str = field(
        default="auto",
        metadata={
            "help": "Frozen base (likelihood rewards, base_prior): auto, frozen_copy or disable_adapter (PEFT)."
        },
    )
    base_prior: bool = field(
        default=False,
        metadata={"help": "Add log p_base(s⊤|x), the frozen base's probability of the terminal object."},
    )
    prefix_reward_stride: int = field(
        default=1,
        metadata={"help": "modified_subtb: compute log R(s_k⊤) every this many tokens, interpolate."},
    )
    scoring_batch_size: int = field(default=64, metadata={"help": "Sequences per base-model scoring batch."})
    reward_temperature_start: float = field(
        default=1.0, metadata={"help": "Reward temperature T_R at step 0."}
    )
    reward_temperature_end: float | None = field(
        default=None, metadata={"help": "T_R at the end of the schedule (default: the start value)."}
    )
    reward_temperature_steps: int | None = field(
        default=None, metadata={"help": "Steps of the T_R schedule (default: training.max_steps)."}
    )
    reward_temperature_schedule: str = field(
        default="linear", metadata={"help": "constant, linear or cosine."}
    )
    allowed_characters: str | None = field(
        default=None, metadata={"help": "Characters a legal generated token may contain (None: all legal)."}
    )
    illegal_token_penalty: float = field(
        default=0.0, metadata={"help": "Subtracted from log R per illegal generated token."}
    )
    truncated_log_reward: float | None = field(
        default=None, metadata={"help": "log R of completions that never stop (default: log reward_floor)."}
    )
    replay_probability: float = field(
        default=0.0, metadata={"help": "Probability that a generation is replayed from the buffer."}
    )
    tempered_probability: float = field(
        default=0.0, metadata={"help": "Probability that a generation samples at a random temperature."}
    )
    temperature_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0],
        metadata={"help": "[low, high] of the tempered sampling temperature."},
    )
    replay_capacity: int = field(
        default=16, metadata={"help": "Completions kept per prompt (top-k by log R)."}
    )
    replay_edit_distance: float = field(
        default=0.0,
        metadata={"help": "Near-duplicate threshold: edit distance / length ≤ this (0: exact dedup only)."},
    )
    replay_min_log_reward: float | None = field(
        default=None, metadata={"help": "Only completions with untempered log R above this enter the buffer."}
    )

    def __post_init__(self) -> None:
        choices = {
            "loss": LOSSES,
            "reward": REWARDS,
            "terminal": TERMINALS,
            "reward_temperature_schedule": SCHEDULES,
            "log_z": LOG_Z_KINDS,
            "likelihood_model": LIKELIHOOD_MODELS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(valid)}")
        if self.subtb_lambda < 0:
            raise ValueError(f"subtb_lambda must be >= 0, got {self.subtb_lambda}")
        if self.subtb_normalization is not None and self.subtb_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"subtb_normalization {self.subtb_normalization!r} is not one of {', '.join(NORMALIZATIONS)} "
                "(or null: each loss's reference)"
            )
        if not 0 < self.reward_floor <= 1:
            raise ValueError(f"reward_floor must be in (0, 1], got {self.reward_floor}")
        if self.reward_temperature_start <= 0 or (self.reward_temperature_end or 1.0) <= 0:
            raise ValueError("reward temperatures must be > 0")
        if self.prefix_reward_stride < 1:
            raise ValueError(f"prefix_reward_stride must be >= 1, got {self.prefix_reward_stride}")
        if self.replay_probability < 0 or self.tempered_probability < 0:
            raise ValueError("replay_probability and tempered_probability must be >= 0")
        if self.replay_probability + self.tempered_probability > 1:
            raise ValueError("replay_probability + tempered_probability must be <= 1")
        low, high = self.temperature_range
        if not 0 < low <= high:
            raise ValueError(
                f"temperature_range must be [low, high] with 0 < low <= high, got {self.temperature_range}"
            )
        if self.replay_capacity < 1:
            raise ValueError(f"replay_capacity must be >= 1, got {self.replay_capacity}")

    def resolved_subtb_normalization(self) -> str:
        """`subtb_normalization`, or each loss's reference: gfn-lm-tuning (modified_subtb), sequence (subtb)."""
        if self.subtb_normalization is not None:
            return self.subtb_normalization
        return "gfn-lm-tuning" if self.loss == "modified_subtb" else "sequence"


def reward_temperature_at(
    step: int, start: float, end: float | None, steps: int | None, schedule: str
) -> float:
    """T_R at `step`: `start` → `end` over `steps` steps (linear or cosine), then `end`.

    linear: T0 + (T1 − T0)·u; cosine: T1 + (T0 − T1)·(1 + cos πu)/2, with u = min(step/steps, 1).
    `constant`, `end=None` or `steps` ≤ 0 give `start`.
    """
    if schedule == "constant" or end is None or not steps or steps <= 0:
        return float(start)
    u = min(max(step, 0) / steps, 1.0)
    if schedule == "linear":
        return float(start + (end - start) * u)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * u)))
    raise ValueError(f"unknown reward temperature schedule {schedule!r}")


# --------------------------------------------------------------------------- replay buffer


def edit_distances(query: Sequence[int], others: Sequence[Sequence[int]]) -> np.ndarray:
    """Levenshtein distances between `query` and each of `others` (token sequences), `[K]`.

    One dynamic-programming row per query token, vectorised over the K others and their positions:
    D_i[j] = min(D_{i−1}[j] + 1, D_{i−1}[j−1] + [q_i ≠ b_j], D_i[j−1] + 1), the last (insertion)
    chain resolved with a running minimum of D_i[j] − j.
    """
    if not others:
        return np.zeros(0, dtype=np.int64)
    lengths = np.array([len(o) for o in others])
    width = int(lengths.max())
    table = np.full((len(others), width), -1, dtype=np.int64)
    for k, other in enumerate(others):
        table[k, : len(other)] = other
    index = np.arange(width + 1)
    previous = np.tile(index, (len(others), 1))
    for i, token in enumerate(query, start=1):
        best = np.minimum(previous[:, :-1] + (table != token), previous[:, 1:] + 1)
        current = np.concatenate([np.full((len(others), 1), i), best], axis=1)
        previous = np.minimum.accumulate(current - index, axis=1) + index
    return previous[np.arange(len(others)), lengths]


@dataclass
class ReplayEntry:
    """One stored completion with its untempered log-rewards (terminal and, for modified SubTB, per prefix)."""

    completion_ids: list[int]
    text: str
    finish_reason: str
    log_reward: float
    prefix_log_reward: list[float] | None = None
    correct: bool | None = None


class ReplayBuffer:
    """Per-prompt top-k buffer of completions by untempered log-reward, deduplicated.

    `add` rejects an exact duplicate (keeping the higher reward of the two) and, with
    `edit_distance` > 0, a near duplicate: an entry within edit distance ≤ `edit_distance` ×
    max(length) of the new one is replaced if the new one is better, else the new one is dropped.
    Each prompt keeps its `capacity` best entries. The row (dataset columns) of every prompt is kept
    so that replayed prompts can be scored and logged like fresh ones.
    """

    def __init__(self, capacity: int = 16, edit_distance: float = 0.0) -> None:
        self.capacity, self.edit_distance = capacity, edit_distance
        self.entries: dict[str, list[ReplayEntry]] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def prompts(self) -> list[str]:
        return [key for key, bucket in self.entries.items() if bucket]

    def add(self, key: str, row: dict[str, Any], entry: ReplayEntry) -> bool:
        """Insert `entry` for prompt `key`; True when the buffer changed."""
        bucket = self.entries.setdefault(key, [])
        self.rows.setdefault(key, dict(row))
        for existing in bucket:
            if existing.completion_ids == entry.completion_ids:
                if entry.log_reward > existing.log_reward:
                    existing.log_reward, existing.prefix_log_reward = (
                        entry.log_reward,
                        entry.prefix_log_reward,
                    )
                    bucket.sort(key=lambda e: -e.log_reward)
                    return True
                return False
        if len(bucket) >= self.capacity and entry.log_reward <= bucket[-1].log_reward:
            return False
        if self.edit_distance > 0 and bucket:
            distances = edit_distances(entry.completion_ids, [e.completion_ids for e in bucket])
            sizes = np.array([max(len(e.completion_ids), len(entry.completion_ids), 1) for e in bucket])
            near = np.flatnonzero(distances <= self.edit_distance * sizes)
            if len(near):
                closest = int(near[np.argmin(distances[near])])
                if entry.log_reward <= bucket[closest].log_reward:
                    return False
                bucket[closest] = entry
                bucket.sort(key=lambda e: -e.log_reward)
                return True
        bucket.append(entry)
        bucket.sort(key=lambda e: -e.log_reward)
        del bucket[self.capacity :]
        return True

    def sample(self, key: str, n: int, rng: random.Random) -> list[ReplayEntry]:
        """`n` entries of prompt `key`: without replacement when there are enough, else with."""
        bucket = self.entries[key]
        if len(bucket) >= n:
            return rng.sample(bucket, n)
        return list(bucket) + [rng.choice(bucket) for _ in range(n - len(bucket))]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "edit_distance": self.edit_distance,
            "entries": {k: [asdict(e) for e in v] for k, v in self.entries.items()},
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity, self.edit_distance = state["capacity"], state["edit_distance"]
        self.entries = {k: [ReplayEntry(**e) for e in v] for k, v in state["entries"].items()}
        self.rows = dict(state["rows"])


# --------------------------------------------------------------------------- heads


class ScalarLogZ(nn.Module):
    """A learned scalar log Z (the same for every prompt)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.value.expand(features.shape[:-1])


class MLPHead(nn.Module):
    """features [..., H] -> [...]: Linear-GELU-Linear, the last layer zero-initialised to output `init`."""

    def __init__(self, hidden_size: int, width: int = 64, init: float = 0.0) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden_size, width)
        self.outer = nn.Linear(width, 1)
        nn.init.zeros_(self.outer.weight)
        nn.init.constant_(self.outer.bias, float(init))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.outer(nn.functional.gelu(self.inner(features.float()))).squeeze(-1)


# --------------------------------------------------------------------------- the trainer


@dataclass
class _Trajectory:
    ids: list[int]  # completion ids
    n: int  # number of trajectory tokens before ⊤
    terminated: bool  # ⊤ was taken at position n


class _HeadOptimizerStep(TrainerCallback):
    """Steps a GFlowNet trainer's head optimizer after each optimizer step (under DeepSpeed)."""

    def __init__(self, trainer: GFlowNetTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.step_head_optimizer()


class GFlowNetTrainer(RolloutTrainer):
    """GFlowNet objectives on engine rollouts with replay and tempered exploration (module docstring)."""

    config: GFlowNetConfig
    needs_rewards = False  # the likelihood reward needs no reward function; checked in __init__

    def __init__(self, *args: Any, base_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.reward in ("verifier", "product") and not self.reward_funcs:
            raise ValueError(f"reward {cfg.reward!r} needs at least one reward function (e.g. correctness)")
        tokenizer = self.processing_class
        if tokenizer.eos_token_id is None:
            raise ValueError("the GFlowNet trainer needs a tokenizer with an EOS token")
        self.marker_ids = encode(tokenizer, self.template.answer_prefix)
        self.terminal_id = tokenizer.eos_token_id if cfg.terminal == "eos" else self.marker_ids[0]
        hidden = self.accelerator.unwrap_model(self.model).config.hidden_size
        heads: dict[str, nn.Module] = {}
        if cfg.loss == "tb":
            heads["log_z"] = (
                ScalarLogZ(cfg.log_z_init)
                if cfg.log_z == "scalar"
                else MLPHead(hidden, cfg.head_hidden_size, cfg.log_z_init)
            )
        elif cfg.loss in ("subtb", "db"):
            heads["flow"] = MLPHead(hidden, cfg.head_hidden_size, cfg.log_z_init)
        self.heads = nn.ModuleDict(heads).to(self.args.device)
        # under DeepSpeed the heads have an optimizer of their own (`create_optimizer`)
        self.head_optimizer: torch.optim.Optimizer | None = None
        self._head_optimizer_state: dict[str, Any] | None = None
        self.replay = ReplayBuffer(cfg.replay_capacity, cfg.replay_edit_distance)
        self.base_model = None
        if cfg.reward in ("likelihood", "product") or cfg.base_prior:
            self.base_model = base_model if base_model is not None else self._frozen_base()
        self.illegal = None
        if cfg.allowed_characters is not None:
            allowed = set(cfg.allowed_characters)
            special = set(tokenizer.all_special_ids)
            self.illegal = torch.tensor(
                [
                    i not in special and not set(tokenizer.decode([i])) <= allowed
                    for i in range(len(tokenizer))
                ]
            )
        self._mode, self._behaviour_temperature = "on_policy", self.sampling.temperature
        self._replay_flags: list[bool] = []
        self._calibration: dict[int, list[float]] = defaultdict(list)
        self._group_offset = 0

    def _frozen_base(self) -> torch.nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        kind = self.config.likelihood_model
        if kind == "disable_adapter" or (kind == "auto" and peft):
            if not peft:
                raise ValueError("likelihood_model: disable_adapter needs a PEFT model")
            return model  # scored under `disable_adapter()`
        return self.policy_copy()  # under ZeRO-3: a partitioned inference engine

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """The model's optimizer plus one group for the log Z / flow heads at `log_z_lr`.

        transformers zeroes only the model's gradients (`model.zero_grad()`), so the heads' are
        zeroed after every optimizer step by a hook (and averaged over ranks before it). Under
        DeepSpeed the heads get an optimizer of their own instead (`step_head_optimizer`; its state
        is in `trainer_extra_state`).
        """
        optimizer = super().create_optimizer(model)
        params = [p for p in self.heads.parameters() if p.requires_grad]
        if params and self.is_deepspeed_enabled:
            # DeepSpeed's ZeRO optimizers take over every group and hold only the engine's parameters
            # (ZeRO-3 rejects others): the heads get a torch optimizer of their own (the Trainer's
            # class), stepped after the engine's step; the model's checkpoint stays a plain one.
            if self.head_optimizer is None:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                kwargs = {**kwargs, "lr": self.config.log_z_lr, "weight_decay": 0.0}
                self.head_optimizer = cls(params, **kwargs)
                if self._head_optimizer_state is not None:
                    self.head_optimizer.load_state_dict(self._head_optimizer_state)
                self.add_callback(_HeadOptimizerStep(self))
            return optimizer
        if params and not any(group.get("gflownet_heads") for group in optimizer.param_groups):
            optimizer.add_param_group(
                {"params": params, "lr": self.config.log_z_lr, "weight_decay": 0.0, "gflownet_heads": True}
            )
            optimizer.register_step_pre_hook(self._reduce_head_grads)
            optimizer.register_step_post_hook(lambda *_: self.heads.zero_grad(set_to_none=True))
        return optimizer

    def step_head_optimizer(self) -> None:
        """Under DeepSpeed: one step of the heads' own optimizer (after the engine's), at `log_z_lr`
        times the model's schedule factor λ(k) for this step k (what a param group under the Trainer's
        LambdaLR gets). λ is read from the schedule, not from the current lr: DeepSpeed steps the
        scheduler inside its engine step, before this runs."""
        self._reduce_head_grads()
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas:
            raise ValueError(
                f"lr_scheduler_type {self.args.lr_scheduler_type!r} is not a LambdaLR schedule; under "
                "DeepSpeed the GFlowNet heads follow the model's schedule through its λ(step): use "
                "linear, cosine, constant or another transformers LambdaLR schedule"
            )
        factor = lambdas[0](self.state.global_step)
        for group in self.head_optimizer.param_groups:
            group["lr"] = self.config.log_z_lr * factor
        self.head_optimizer.step()
        self.heads.zero_grad(set_to_none=True)

    def _reduce_head_grads(self, *_: Any) -> None:
        if self.accelerator.num_processes <= 1:
            return
        for p in self.heads.parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.accelerator.reduce(grad, reduction="mean")

    def head_param_group(self) -> dict[str, Any] | None:
        """The optimizer group of the log Z / flow heads (None before the optimizer exists)."""
        if self.head_optimizer is not None:
            return self.head_optimizer.param_groups[0]
        if self.optimizer is None:
            return None
        return next((g for g in self.optimizer.param_groups if g.get("gflownet_heads")), None)

    # ------------------------------------------------------------------ behaviour policy
    def reward_temperature(self, step: int | None = None) -> float:
        cfg = self.config
        steps = (
            cfg.reward_temperature_steps if cfg.reward_temperature_steps is not None else self.args.max_steps
        )
        step = self.state.global_step if step is None else step
        return reward_temperature_at(
            step,
            cfg.reward_temperature_start,
            cfg.reward_temperature_end,
            steps,
            cfg.reward_temperature_schedule,
        )

    def _rng(self, salt: int, per_rank: bool = True) -> random.Random:
        """A generator seeded by (seed, step, rank, salt): a resume repeats the same behaviour choices.
        `per_rank=False` leaves the rank out (every rank draws alike, as one process would)."""
        rank = self.args.process_index if per_rank else "all"
        return random.Random(f"{self.args.seed}-{self.state.global_step}-{rank}-{salt}")

    def choose_behaviour(self) -> tuple[str, float]:
        """(mode, sampling temperature) of this generation: on_policy, tempered or replay."""
        cfg = self.config
        # one behaviour per generation for all ranks: a generation's prompts are sampled alike
        # whatever the number of ranks (replay still needs this rank's buffer to be non-empty)
        rng = self._rng(1, per_rank=False)
        u = rng.random()
        if u < cfg.replay_probability and self.replay.prompts():
            return "replay", self.sampling.temperature
        if u < cfg.replay_probability + cfg.tempered_probability:
            low, high = cfg.temperature_range
            return "tempered", rng.uniform(low, high)
        return "on_policy", self.sampling.temperature

    def generation_sampling(self) -> Sampling:
        sampling = super().generation_sampling()
        return Sampling(**{**sampling.__dict__, "temperature": self._behaviour_temperature})

    def needs_old_logprobs(self) -> bool:
        return False  # the balance losses are off-policy: no π_old

    def _generate_and_buffer(self, rows: list[dict[str, Any]]) -> None:
        # Override of a private base method: the behaviour policy may replace the loader's prompts by
        # replayed ones, which the base class's `generate(rows)` hook cannot do (see the report).
        self._flush_calibration()
        self._mode, self._behaviour_temperature = self.choose_behaviour()
        flags = [False] * len(rows)
        if self._mode == "replay":
            keys = self.replay.prompts()
            chosen = self._rng(2).sample(keys, min(len(keys), len(rows)))
            rows = [self.replay.rows[k] for k in chosen] + list(rows[len(chosen) :])
            flags = [True] * len(chosen) + flags[len(chosen) :]
        self._replay_flags = flags
        super()._generate_and_buffer(rows)

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        flags = self._replay_flags if len(self._replay_flags) == len(rows) else [False] * len(rows)
        fresh = [row for row, replayed in zip(rows, flags) if not replayed]
        fresh_groups = iter(super().generate(fresh) if fresh else [])
        rng = self._rng(3)
        groups = []
        for row, replayed in zip(rows, flags):
            if not replayed:
                groups.append(next(fresh_groups))
                continue
            entries = self.replay.sample(row["prompt"], self.config.num_generations, rng)
            groups.append(
                [
                    Rollout(
                        prompt_ids=list(row["prompt_ids"]),
                        completion_ids=list(e.completion_ids),
                        logprobs=[0.0] * len(e.completion_ids),
                        finish_reason=e.finish_reason,
                        text=e.text,
                        extra={"replay": e},
                    )
                    for e in entries
                ]
            )
        self.record("gfn/replay_fraction", sum(flags) / max(len(flags), 1))
        self.record("gfn/behaviour_temperature", self._behaviour_temperature)
        return groups

    # ------------------------------------------------------------------ rewards
    def trajectory(self, rollout: Rollout) -> _Trajectory:
        """Where the trajectory stops: n tokens, then ⊤ at position n (if it was taken)."""
        ids = list(rollout.completion_ids)
        eos = self.processing_class.eos_token_id
        ended = bool(ids) and ids[-1] == eos and not rollout.truncated
        if self.config.terminal == "eos":
            return _Trajectory(ids, len(ids) - 1 if ended else len(ids), ended)
        cut = find_first(ids, self.marker_ids)
        if cut >= 0:
            return _Trajectory(ids, cut, True)
        return _Trajectory(ids, len(ids) - 1 if ended else len(ids), False)

    def _trace_part(self, ids: list[int]) -> list[int]:
        """The trace z of a prefix: its tokens before the answer marker (the whole prefix without one)."""
        cut = find_first(ids, self.marker_ids)
        return ids[:cut] if cut >= 0 else ids

    def log_rewards(
        self, rows: list[dict[str, Any]], rollouts: list[Rollout], trajectories: list[_Trajectory], positions
    ) -> list[dict[int, float]]:
        """Untempered log R(s_k⊤) for each rollout i and each prefix length k in `positions[i]`."""
        cfg = self.config
        tokenizer = self.processing_class
        out: list[dict[int, float]] = [dict.fromkeys(ks, 0.0) for ks in positions]
        floor = math.log(cfg.reward_floor)
        if cfg.reward in ("verifier", "product"):
            jobs = []  # (i, k, text)
            for i, (rollout, traj, ks) in enumerate(zip(rollouts, trajectories, positions)):
                for k in ks:
                    if cfg.terminal == "answer":
                        if k == traj.n and traj.terminated:
                            jobs.append((i, k, rollout.text))
                        else:
                            out[i][k] += floor  # no answer written yet
                    elif k == traj.n:
                        jobs.append((i, k, rollout.text))
                    else:
                        jobs.append((i, k, None))
            undecoded = [j for j, job in enumerate(jobs) if job[2] is None]
            texts = tokenizer.batch_decode(
                [trajectories[jobs[j][0]].ids[: jobs[j][1]] for j in undecoded], skip_special_tokens=True
            )
            for j, text in zip(undecoded, texts):
                jobs[j] = (jobs[j][0], jobs[j][1], text)
            if jobs:
                flat_rows = [rows[i] for i, _, _ in jobs]
                columns = {
                    key: [r[key] for r in flat_rows]
                    for key in flat_rows[0]
                    if key not in ("prompt", "prompt_ids")
                }
                columns["trainer_state"] = self.state
                table = self.call_rewards(
                    self.reward_funcs,
                    [r["prompt"] for r in flat_rows],
                    [text for _, _, text in jobs],
                    [trajectories[i].ids[:k] for i, k, _ in jobs],
                    columns,
                )
                task = self.combine_rewards(table).clamp(min=cfg.reward_floor).log()
                for (i, k, _), value in zip(jobs, task.tolist()):
                    out[i][k] += value
        if cfg.reward in ("likelihood", "product"):
            for (i, k), value in self._likelihoods(rows, rollouts, trajectories, positions).items():
                out[i][k] += value
        if self.illegal is not None and cfg.illegal_token_penalty:
            for i, (traj, ks) in enumerate(zip(trajectories, positions)):
                flags = (
                    self.illegal[torch.tensor(traj.ids[: traj.n], dtype=torch.long)].long().cumsum(0).tolist()
                )
                counts = [0, *flags]
                for k in ks:
                    out[i][k] -= cfg.illegal_token_penalty * counts[k]
        return out

    @torch.no_grad()
    def _likelihoods(self, rows, rollouts, trajectories, positions) -> dict[tuple[int, int], float]:
        """log p_base(y* | x, z(s_k)) for every requested (i, k)."""
        cfg = self.config
        tokenizer = self.processing_class
        unique: dict[tuple[int, tuple[int, ...]], int] = {}
        sequences, starts = [], []
        wanted: dict[tuple[int, int], int] = {}
        for i, (row, rollout, traj, ks) in enumerate(zip(rows, rollouts, trajectories, positions)):
            for k in ks:
                z = traj.ids[:k] if cfg.terminal == "answer" else self._trace_part(traj.ids[:k])
                key = (i, tuple(z))
                if key not in unique:
                    laid = scoring_ids(
                        self.template, tokenizer, rollout.prompt_ids, z, str(row[cfg.answer_column])
                    )
                    unique[key] = len(sequences)
                    sequences.append(laid.ids)
                    starts.append(laid.answer_start)
                wanted[(i, k)] = unique[key]
        if not sequences:
            return {}
        pad = self.processing_class.pad_token_id or 0
        with self._base_scope() as base:
            logps = span_token_logprobs(
                base, sequences, starts, pad_id=pad, batch_size=self.config.scoring_batch_size
            )
        values = [float(logp.sum()) for logp in logps]
        return {key: values[index] for key, index in wanted.items()}

    @contextlib.contextmanager
    def _base_scope(self):
        """The frozen base model in eval mode (the PEFT policy with its adapters disabled, or the copy)."""
        base = self.base_model
        was_training = base.training
        base.eval()
        try:
            if base is self.accelerator.unwrap_model(self.model):
                with base.disable_adapter():
                    yield base
            else:
                yield base
        finally:
            base.train(was_training)

    @torch.no_grad()
    def base_prior_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the frozen base: log p_base of the completion tokens `[B, T]` and of ⊤ after each prefix `[B, T+1]`."""
        size = self.args.per_device_train_batch_size
        token_parts, stop_parts = [], []
        with self._base_scope() as base:
            for start in range(0, batch["completion_ids"].shape[0], size):
                part = {
                    k: v[start : start + size] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0
                }
                log_pf, log_stop, _ = self.forward_terms(base, part, with_terminal=True)
                token_parts.append(log_pf.float().cpu())
                stop_parts.append(log_stop.float().cpu())
        return torch.cat(token_parts), torch.cat(stop_parts)

    def _prefix_positions(self, traj: _Trajectory) -> list[int]:
        stride = self.config.prefix_reward_stride
        return sorted({*range(0, traj.n + 1, stride), traj.n})

    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = super().build_batch(rows, groups, rewards)
        flat_rows = [row for row, group in zip(rows, groups) for _ in group]
        rollouts = [r for group in groups for r in group]
        trajectories = [self.trajectory(r) for r in rollouts]
        width = batch["completion_ids"].shape[1]
        size = len(rollouts)
        per_prefix = cfg.loss == "modified_subtb"
        fresh = [i for i, r in enumerate(rollouts) if "replay" not in r.extra]
        positions = [
            self._prefix_positions(trajectories[i]) if per_prefix else [trajectories[i].n] for i in fresh
        ]
        computed = self.log_rewards(
            [flat_rows[i] for i in fresh],
            [rollouts[i] for i in fresh],
            [trajectories[i] for i in fresh],
            positions,
        )
        truncated_value = (
            cfg.truncated_log_reward if cfg.truncated_log_reward is not None else math.log(cfg.reward_floor)
        )
        terminal = torch.zeros(size)
        prefix = torch.zeros(size, width + 1)
        if cfg.base_prior and fresh:
            base_tokens, base_stop = self.base_prior_terms(batch)
            prefix_logp = torch.cat([torch.zeros(size, 1), base_tokens.cumsum(dim=1)], dim=1)  # Σ_{t<k}
            for j, i in enumerate(fresh):
                for k in computed[j]:
                    computed[j][k] += float(prefix_logp[i, k] + base_stop[i, k])
        stored: dict[int, ReplayEntry] = {}
        for j, i in enumerate(fresh):
            traj, values = trajectories[i], computed[j]
            terminal[i] = values[traj.n] if traj.terminated else truncated_value
            full = None
            if per_prefix:
                ks = sorted(values)
                full = np.interp(np.arange(traj.n + 1), ks, [values[k] for k in ks]).tolist()
            stored[i] = ReplayEntry(
                completion_ids=traj.ids,
                text=rollouts[i].text,
                finish_reason=rollouts[i].finish_reason,
                log_reward=float(terminal[i]),
                prefix_log_reward=full,
            )
        for i, rollout in enumerate(rollouts):
            entry = rollout.extra.get("replay") or stored[i]
            terminal[i] = entry.log_reward
            if per_prefix:
                if entry.prefix_log_reward is None or len(entry.prefix_log_reward) != trajectories[i].n + 1:
                    raise RuntimeError(
                        "a replayed entry has no per-prefix log-rewards (buffer from another loss?)"
                    )
                prefix[i, : trajectories[i].n + 1] = torch.tensor(entry.prefix_log_reward)
        temperature = self.reward_temperature()
        positions_t = torch.arange(width)
        n = torch.tensor([t.n for t in trajectories])
        terminated = torch.tensor([t.terminated for t in trajectories])
        batch["trace_mask"] = (positions_t.unsqueeze(0) < n.unsqueeze(1)).float()
        batch["tb_mask"] = (positions_t.unsqueeze(0) < (n + terminated.long()).unsqueeze(1)).float()
        batch["log_reward"] = terminal / temperature
        if per_prefix:
            batch["prefix_log_reward"] = prefix / temperature
        groups_index = torch.arange(len(groups)).repeat_interleave(torch.tensor([len(g) for g in groups]))
        batch["group"] = groups_index + self._group_offset
        self._group_offset += len(groups)
        if cfg.loss in ("subtb", "modified_subtb"):
            # the divisor of each row's pair sum, over the whole group (micro-batches split groups)
            batch["subtb_log_norm"] = subtb_log_normalizer(
                batch["trace_mask"] if per_prefix else batch["tb_mask"],
                cfg.subtb_lambda,
                cfg.resolved_subtb_normalization(),
                groups_index,
            )
        # metrics and the replay buffer (fresh completions only)
        correct = [is_correct(r.text, row) for r, row in zip(rollouts, flat_rows)]
        for i in fresh:
            stored[i].correct = correct[i]
            if trajectories[i].terminated and (
                cfg.replay_min_log_reward is None or stored[i].log_reward > cfg.replay_min_log_reward
            ):
                self.replay.add(flat_rows[i]["prompt"], flat_rows[i], stored[i])
        self.record("gfn/reward_temperature", temperature)
        self.record("gfn/log_reward", terminal.mean())
        self.record("gfn/replay_size", len(self.replay))
        start = 0
        distinct, diversity, accuracy = [], [], []
        for group in groups:
            members = list(range(start, start + len(group)))
            start += len(group)
            if any("replay" in rollouts[i].extra for i in members):
                continue
            answers = [self.template.split_completion(rollouts[i].text)[1] for i in members]
            distinct.append(distinct_correct(answers, [correct[i] for i in members]))
            diversity.append(pairwise_diversity([rollouts[i].text for i in members]))
            accuracy.extend(correct[i] for i in members)
        if distinct:
            self.record("diversity/distinct_correct", sum(distinct) / len(distinct))
            self.record("diversity/pairwise", sum(diversity) / len(diversity))
            self.record("gfn/accuracy", sum(accuracy) / len(accuracy))
        return batch

    # ------------------------------------------------------------------ loss
    def forward_terms(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_terminal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """log P_F of the completion tokens `[B, T]` at temperature 1, log P_F(⊤|s_k) `[B, T+1]` (if
        asked) and the final hidden states after each prefix s_0..s_T `[B, T+1, H]`."""
        device = next(model.parameters()).device
        prompt_ids, completion_ids = batch["prompt_ids"].to(device), batch["completion_ids"].to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).to(device)
        width = completion_ids.shape[1]
        # position of s_k predicts token k; logits instead of hidden states under ZeRO-3 (`final_states`)
        states, head, hidden = final_states(
            model, self.accelerator.unwrap_model(model), input_ids, attention, width + 1
        )
        chunk = self.config.logprob_chunk_size
        log_pf, _ = states_token_logprobs(states[:, :-1], head, completion_ids, chunk_size=chunk)
        log_terminal = None
        if with_terminal:
            stop = torch.full(hidden.shape[:2], self.terminal_id, dtype=torch.long, device=device)
            log_terminal, _ = states_token_logprobs(states, head, stop, chunk_size=chunk)
        return log_pf, log_terminal, hidden

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        log_pf, log_terminal, hidden = self.forward_terms(
            model, batch, with_terminal=cfg.loss == "modified_subtb"
        )
        device = log_pf.device
        tb_mask = batch["tb_mask"].to(device)
        log_reward = batch["log_reward"].to(device)
        if cfg.loss == "tb":
            log_z = self.heads["log_z"](hidden[:, 0].detach())
            per_sequence = trajectory_balance(log_z, log_pf, tb_mask, log_reward)
            self.record("gfn/log_z", log_z.detach().mean())
        elif cfg.loss in ("subtb", "db"):
            flow = set_terminal_log_flow(self.heads["flow"](hidden.detach()), tb_mask, log_reward)
            if cfg.loss == "subtb":
                per_sequence = subtrajectory_balance(
                    flow, log_pf, tb_mask, cfg.subtb_lambda, log_normalizer=batch["subtb_log_norm"]
                )
            else:
                per_sequence = detailed_balance(flow, log_pf, tb_mask).sum(-1) / tb_mask.sum(-1).clamp(min=1)
            self.record("gfn/log_z", flow[:, 0].detach().mean())
        else:
            prefix = batch["prefix_log_reward"].to(device)
            per_sequence = modified_subtrajectory_balance(
                log_pf,
                log_terminal,
                batch["trace_mask"].to(device),
                prefix,
                cfg.subtb_lambda,
                log_normalizer=batch["subtb_log_norm"],
            )
            # the implied log Z: log F(s_0) = log R(s_0⊤) − log P_F(⊤|s_0)
            self.record("gfn/log_z", (prefix[:, 0] - log_terminal[:, 0]).detach().mean())
        residual = (log_reward - (log_pf * tb_mask).sum(-1)).detach().cpu()
        for group, value in zip(batch["group"].tolist(), residual.tolist()):
            self._calibration[group].append(value)
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        accumulation = accumulation if model.training else 1
        loss = per_sequence.mean()
        self.record(f"loss/{cfg.loss}", loss.detach())
        return loss / accumulation

    def _flush_calibration(self) -> None:
        variances = [torch.tensor(v).var().item() for v in self._calibration.values() if len(v) > 1]
        if variances:
            self.record("gfn/var_logr_minus_logpf", sum(variances) / len(variances))
        self._calibration.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_calibration()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        state = {"heads": self.heads.state_dict(), "replay": self.replay.state_dict()}
        if self.head_optimizer is not None:  # DeepSpeed: the heads' optimizer is not in its checkpoint
            state["head_optimizer"] = self.head_optimizer.state_dict()
        return state

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        if "heads" in state:
            self.heads.load_state_dict(state["heads"])
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if "head_optimizer" in state:  # loaded when the optimizer is created (after this, in `train`)
            self._head_optimizer_state = state["head_optimizer"]
            if self.head_optimizer is not None:
                self.head_optimizer.load_state_dict(state["head_optimizer"])

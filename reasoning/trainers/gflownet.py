"""GFlowNet fine-tuning of reasoning: TB with a learned log Z, SubTB(λ), DB, modified SubTB.

Generation is a tree-structured GFlowNet (docs/methods/gflownet.md): states are prefixes s_k of the
completion, P_B = 1, and a terminal object is a trajectory followed by the stop action ⊤. With
`terminal: eos` the trajectory is the whole completion and ⊤ is EOS; with `terminal: answer` the
trajectory is the trace (the tokens before the first answer marker, `templates.TraceCutter` with
`at="first"`) and ⊤ is the marker's first token, as in Hu et al. where the answer is appended by the
reward. The policy's log P_F is always computed at temperature 1, whatever the behaviour policy's
sampling temperature (the balance losses are off-policy).

Losses (`objectives/gflownet.py`, mean over the micro-batch's rows): `tb` with log Z a learned scalar
or an MLP on the prompt's last hidden state; `subtb` / `db` with log F(s_k) from an MLP head on the
(detached) hidden state after s_k; `modified_subtb` (Hu et al.), every prefix terminable with
F(s_k) = R(s_k⊤)/P_F(⊤|s_k), on the log-reward of every prefix (`prefix_reward_stride` > 1 computes it
every few tokens and interpolates, as LaCoT does). The heads are side parameters at `log_z_lr`
(`RolloutTrainer.add_side_parameters`). SubTB pair weights are normalised per sequence or over each
prompt's samples (`subtb_normalization`); the divisor is computed for the whole group when the
generation batch is built, so micro-batches that split a group add up to the group's loss.

Rewards: untempered log R, divided by the reward temperature T_R (`objectives.reward_temperature_at`):
`verifier` log max(r, `reward_floor`) of the reward functions (`RolloutTrainer.reward_table`);
`likelihood` log p_base(y* | x, z) of the known answer after the trace z under the frozen base
(`RolloutTrainer.frozen_model`, `templates.answer_layout` with EOS scored); `product` both. `base_prior`
adds log p_base(s_k⊤ | x): the target becomes p_base(x⊤)·R(x). Illegal tokens cost
`illegal_token_penalty` each; completions that never reach ⊤ get `truncated_log_reward`.

Exploration: each generation is on-policy, tempered (a temperature from `temperature_range`) or
replayed from a per-prompt buffer of the best completions by untempered log R (`make_batch`
substitutes the buffer's prompts; the buffer is checkpointed). Metrics: docs/gflownet.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reasoning.data.templates import TraceCut, TraceCutter, answer_layout, encode
from reasoning.eval.metrics import distinct_correct, pairwise_diversity
from reasoning.models.scoring import CompletionForward, no_grad_chunks
from reasoning.objectives.gflownet import (
    balance_heads,
    detailed_balance,
    group_variances,
    modified_subtrajectory_balance,
    reward_temperature_at,
    set_terminal_log_flow,
    subtb_log_normalizer,
    subtrajectory_balance,
    trajectory_balance,
)
from reasoning.rewards.verifier import is_correct
from reasoning.rollout import Rollout, Sampling
from reasoning.trainers.base import LossOutput, RolloutTrainer
from reasoning.trainers.gflownet_config import LIKELIHOOD_MODELS, GFlowNetConfig
from reasoning.trainers.gflownet_replay import ReplayBuffer, ReplayEntry

__all__ = ["GFlowNetConfig", "GFlowNetTrainer"]


@dataclass
class Trajectory:
    """A completion as a GFlowNet trajectory: `n` tokens, then ⊤ at position n when `terminated`."""

    ids: list[int]  # completion ids
    n: int  # number of trajectory tokens before ⊤
    terminated: bool  # ⊤ was taken at position n
    cut: TraceCut  # the completion cut at its first answer marker

    def prefix_trace(self, k: int, terminal: str) -> tuple[list[int], str | None]:
        """The trace z of the prefix s_k and the answer marker a likelihood reward appends after it (None:
        the template's `answer_prefix`). `terminal: answer`: the prefix itself (its own marker at k = n).
        `terminal: eos`: the tokens before the first answer marker once the prefix holds all of it, else
        the whole prefix — the cutter on the prefix, read off the completion's cut (the first marker
        is complete in s_k exactly when k reaches the token that completes it, `policy_length`)."""
        cut = self.cut
        if terminal == "answer":
            return self.ids[:k], cut.marker if self.terminated and k == self.n else None
        if cut.marker_found and k >= cut.policy_length:
            return cut.trace, cut.marker
        return self.ids[:k], None


class GFlowNetTrainer(RolloutTrainer):
    """GFlowNet objectives on engine rollouts with replay and tempered exploration (module docstring).

    `base_model`: the frozen base of the likelihood reward and the base prior (default: the starting
    policy, `RolloutTrainer.frozen_model` of kind `likelihood_model`).
    """

    config: GFlowNetConfig
    needs_rewards = False  # the likelihood reward needs no reward function; checked in __init__

    def __init__(self, *args: Any, base_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg, tokenizer = self.config, self.processing_class
        if cfg.reward in ("verifier", "product") and not self.reward_funcs:
            raise ValueError(f"reward {cfg.reward!r} needs at least one reward function (e.g. correctness)")
        if tokenizer.eos_token_id is None:
            raise ValueError("the GFlowNet trainer needs a tokenizer with an EOS token")
        self.cutter = TraceCutter(self.template, tokenizer, at="first")  # ⊤ of `terminal: eos` is EOS only
        marker_ids = encode(tokenizer, self.template.answer_marker)
        self.terminal_id = tokenizer.eos_token_id if cfg.terminal == "eos" else marker_ids[0]
        hidden = self.accelerator.unwrap_model(self.model).config.hidden_size
        self.heads = balance_heads(cfg.loss, cfg.log_z, hidden, cfg.head_hidden_size, cfg.log_z_init)
        self.add_side_parameters("heads", self.heads, cfg.log_z_lr)
        self.replay = ReplayBuffer(cfg.replay_capacity, cfg.replay_edit_distance)
        self.base_model = None
        if cfg.needs_base():
            self.base_model = self.frozen_model(base_model, kind=LIKELIHOOD_MODELS[cfg.likelihood_model])
        self.illegal = None
        if cfg.allowed_characters is not None:
            allowed, special = set(cfg.allowed_characters), set(tokenizer.all_special_ids)
            self.illegal = torch.tensor(
                [
                    i not in special and not set(tokenizer.decode([i])) <= allowed
                    for i in range(len(tokenizer))
                ]
            )
        self._mode, self._behaviour_temperature = "on_policy", self.sampling.temperature
        self._replay_flags: list[bool] = []
        self._calibration: tuple[list[int], list[float]] = ([], [])  # (group, log R − log P_F) per row
        self._group_offset = 0

    # ------------------------------------------------------------------ behaviour policy
    def reward_temperature(self, step: int | None = None) -> float:
        """T_R at `step` (default: the current step), over `reward_temperature_steps` or `max_steps`."""
        cfg = self.config
        steps = (
            cfg.reward_temperature_steps if cfg.reward_temperature_steps is not None else self.args.max_steps
        )
        return reward_temperature_at(
            self.state.global_step if step is None else step,
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

    def make_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Hook: choose this generation's behaviour; a replayed one puts the buffer's prompts first
        (`generate` then draws their completions from the buffer instead of the engine)."""
        self._flush_calibration()
        self._mode, self._behaviour_temperature = self.choose_behaviour()
        flags = [False] * len(rows)
        if self._mode == "replay":
            keys = self.replay.prompts()
            chosen = self._rng(2).sample(keys, min(len(keys), len(rows)))
            rows = [self.replay.rows[k] for k in chosen] + list(rows[len(chosen) :])
            flags = [True] * len(chosen) + flags[len(chosen) :]
        self._replay_flags = flags
        return super().make_batch(rows)

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
    def trajectory(self, rollout: Rollout) -> Trajectory:
        """Where the trajectory stops: n tokens, then ⊤ at position n (if it was taken)."""
        ids = list(rollout.completion_ids)
        ended = bool(ids) and ids[-1] == self.processing_class.eos_token_id and not rollout.truncated
        n = len(ids) - 1 if ended else len(ids)
        cut = self.cutter(ids, rollout.truncated)
        if self.config.terminal == "eos":
            return Trajectory(ids, n, ended, cut)
        if cut.marker_found:
            return Trajectory(ids, len(cut.trace), True, cut)
        return Trajectory(ids, n, False, cut)

    def log_rewards(
        self, rows: list[dict[str, Any]], rollouts: list[Rollout], trajectories: list[Trajectory], positions
    ) -> list[dict[int, float]]:
        """Untempered log R(s_k⊤) for each rollout i and each prefix length k in `positions[i]`."""
        cfg = self.config
        out: list[dict[int, float]] = [dict.fromkeys(ks, 0.0) for ks in positions]
        if cfg.reward in ("verifier", "product"):
            jobs = []  # (i, k, text): the text of s_k⊤ is decoded below when None
            for i, (rollout, traj, ks) in enumerate(zip(rollouts, trajectories, positions)):
                for k in ks:
                    if k == traj.n and (traj.terminated or cfg.terminal == "eos"):
                        jobs.append((i, k, rollout.text))
                    elif cfg.terminal == "answer":
                        out[i][k] += math.log(cfg.reward_floor)  # no answer written yet
                    else:
                        jobs.append((i, k, None))
            undecoded = [j for j, job in enumerate(jobs) if job[2] is None]
            texts = self.processing_class.batch_decode(
                [trajectories[jobs[j][0]].ids[: jobs[j][1]] for j in undecoded], skip_special_tokens=True
            )
            for j, text in zip(undecoded, texts):
                jobs[j] = (jobs[j][0], jobs[j][1], text)
            if jobs:
                table = self.reward_table(
                    [rows[i] for i, _, _ in jobs],
                    [text for _, _, text in jobs],
                    [trajectories[i].ids[:k] for i, k, _ in jobs],
                )
                task = self.combine_rewards(table).clamp(min=cfg.reward_floor).log()
                for (i, k, _), value in zip(jobs, task.tolist()):
                    out[i][k] += value
        if cfg.reward in ("likelihood", "product"):
            for (i, k), value in self._likelihoods(rows, rollouts, trajectories, positions).items():
                out[i][k] += value
        if self.illegal is not None and cfg.illegal_token_penalty:
            for i, (traj, ks) in enumerate(zip(trajectories, positions)):
                flags = self.illegal[torch.tensor(traj.ids[: traj.n], dtype=torch.long)]
                counts = [0, *flags.long().cumsum(0).tolist()]
                for k in ks:
                    out[i][k] -= cfg.illegal_token_penalty * counts[k]
        return out

    def _likelihoods(self, rows, rollouts, trajectories, positions) -> dict[tuple[int, int], float]:
        """log p_base(y* | x, z(s_k)) for every requested (i, k), each distinct layout scored once."""
        cfg, template, tokenizer = self.config, self.template, self.processing_class
        unique: dict[tuple[int, tuple[int, ...], str], int] = {}  # (i, z, marker text) -> layout
        layouts, wanted = [], {}
        for i, (row, rollout, traj, ks) in enumerate(zip(rows, rollouts, trajectories, positions)):
            answer = str(row[cfg.answer_column])
            for k in ks:
                z, marker = traj.prefix_trace(k, cfg.terminal)
                key = (i, tuple(z), marker or template.answer_prefix)
                if key not in unique:
                    unique[key] = len(layouts)
                    layouts.append(
                        answer_layout(
                            template, tokenizer, rollout.prompt_ids, z, answer, score_eos=True, marker=marker
                        )
                    )
                wanted[(i, k)] = unique[key]
        if not layouts:
            return {}
        scored = self.base_model.answer_logprobs(
            layouts, pad_id=self.pad_id, batch_size=cfg.scoring_batch_size
        )
        values = [float(logp[mask].sum()) for logp, mask in zip(scored.answer, scored.answer_mask)]
        return {key: values[index] for key, index in wanted.items()}

    def base_prior_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the frozen base: log p_base of the completion tokens `[B, T]` and of ⊤ after each prefix `[B, T+1]`."""
        with self.base_model.scope() as base:
            tokens, stop = no_grad_chunks(
                lambda part: self.forward_terms(base, part, with_terminal=True)[:2],
                batch,
                self.args.per_device_train_batch_size,
            )
        return tokens.float(), stop.float()

    def _prefix_positions(self, traj: Trajectory) -> list[int]:
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
        width, size = batch["completion_ids"].shape[1], len(rollouts)
        per_prefix = cfg.loss == "modified_subtb"
        fresh = [i for i, r in enumerate(rollouts) if "replay" not in r.extra]
        positions = [
            self._prefix_positions(trajectories[i]) if per_prefix else [trajectories[i].n] for i in fresh
        ]
        with self.timed("log_rewards"):
            computed = self.log_rewards(
                [flat_rows[i] for i in fresh],
                [rollouts[i] for i in fresh],
                [trajectories[i] for i in fresh],
                positions,
            )
            if cfg.base_prior and fresh:
                base_tokens, base_stop = self.base_prior_terms(batch)
                prefix_logp = torch.cat([torch.zeros(size, 1), base_tokens.cumsum(dim=1)], dim=1)  # Σ_{t<k}
                for j, i in enumerate(fresh):
                    for k in computed[j]:
                        computed[j][k] += float(prefix_logp[i, k] + base_stop[i, k])
        terminal, prefix = torch.zeros(size), torch.zeros(size, width + 1)
        stored: dict[int, ReplayEntry] = {}
        for j, i in enumerate(fresh):
            traj, values = trajectories[i], computed[j]
            terminal[i] = values[traj.n] if traj.terminated else cfg.resolved_truncated_log_reward()
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
        correct = [is_correct(r.text, row) for r, row in zip(rollouts, flat_rows)]
        for i in fresh:  # the replay buffer takes fresh completions only
            stored[i].correct = correct[i]
            if trajectories[i].terminated and (
                cfg.replay_min_log_reward is None or stored[i].log_reward > cfg.replay_min_log_reward
            ):
                self.replay.add(flat_rows[i]["prompt"], flat_rows[i], stored[i])
        self.record("gfn/reward_temperature", temperature)
        self.record("gfn/log_reward", terminal.mean())
        self.record("gfn/replay_size", len(self.replay))
        self._record_diversity(groups, rollouts, correct)
        return batch

    def _record_diversity(
        self, groups: list[list[Rollout]], rollouts: list[Rollout], correct: list[bool]
    ) -> None:
        """Accuracy and diversity (`eval.metrics`) over the groups sampled fresh by this generation."""
        start, distinct, diversity, accuracy = 0, [], [], []
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

    # ------------------------------------------------------------------ loss
    def forward_terms(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_terminal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One forward (`models.scoring.CompletionForward`): log P_F of the completion tokens `[B, T]` at
        temperature 1, log P_F(⊤|s_k) `[B, T+1]` (if asked) and the final hidden states after each
        prefix s_0..s_T `[B, T+1, H]` (the heads' input)."""
        forward = CompletionForward(model, batch, self.config.logprob_chunk_size)
        log_terminal = forward.token_logprobs(self.terminal_id) if with_terminal else None
        return forward.logprobs()[0], log_terminal, forward.hidden

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.config
        log_pf, log_terminal, hidden = self.forward_terms(
            model, batch, with_terminal=cfg.loss == "modified_subtb"
        )
        device = log_pf.device
        tb_mask, log_reward = batch["tb_mask"].to(device), batch["log_reward"].to(device)
        if cfg.loss == "tb":
            log_z = self.heads["log_z"](hidden[:, 0].detach())
            per_sequence = trajectory_balance(log_z, log_pf, tb_mask, log_reward)
        elif cfg.loss in ("subtb", "db"):
            flow = set_terminal_log_flow(self.heads["flow"](hidden.detach()), tb_mask, log_reward)
            if cfg.loss == "subtb":
                per_sequence = subtrajectory_balance(
                    flow, log_pf, tb_mask, cfg.subtb_lambda, log_normalizer=batch["subtb_log_norm"]
                )
            else:
                per_sequence = detailed_balance(flow, log_pf, tb_mask).sum(-1) / tb_mask.sum(-1).clamp(min=1)
            log_z = flow[:, 0]
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
            log_z = prefix[:, 0] - log_terminal[:, 0]  # the implied log F(s_0) = log R(s_0⊤) − log P_F(⊤|s_0)
        residual = (log_reward - (log_pf * tb_mask).sum(-1)).detach().cpu()
        self._calibration[0].extend(batch["group"].tolist())
        self._calibration[1].extend(residual.tolist())
        loss = per_sequence.mean()
        return LossOutput(loss, {"gfn/log_z": log_z.detach().mean(), f"loss/{cfg.loss}": loss.detach()})

    def _flush_calibration(self) -> None:
        """Record Var(log R − log P_F) per prompt since the last flush (0 for a calibrated sampler)."""
        variance = group_variances(*self._calibration)
        if variance is not None:
            self.record("gfn/var_logr_minus_logpf", variance)
        self._calibration = ([], [])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_calibration()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        return {"replay": self.replay.state_dict()}  # the heads are side parameters (saved by the base)

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])

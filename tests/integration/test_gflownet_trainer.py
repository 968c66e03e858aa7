"""The GFlowNet trainer on the real stack (tiny model, hf engine): losses against independent
recomputations from full logits, the log Z optimizer group, replay buffer, checkpoints, schedules."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.data.templates import encode
from reasoning.eval.metrics import distinct_correct, pairwise_diversity
from reasoning.objectives.gflownet import reward_temperature_at, set_terminal_log_flow, subtb_log_normalizer
from reasoning.rewards.verifier import correctness, is_correct
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.checkpoint import EXTRA_STATE, load_state_file
from reasoning.trainers.gflownet import GFlowNetConfig, GFlowNetTrainer
from reasoning.trainers.gflownet_replay import ReplayBuffer, ReplayEntry, edit_distances

DATA = "synthetic:addition?digits=3&n=64&seed=3&split=train"


def make_trainer(path, output_dir, max_steps=3, **config):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return GFlowNetTrainer(
        model=model,
        args=args,
        config=GFlowNetConfig(num_generations=4, **config),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=[correctness],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=40, seed=0),
    )


def one_batch(trainer, prompts=2):
    rows = [trainer.train_dataset[i] for i in range(prompts)]
    trainer._replay_flags = [False] * len(rows)
    groups = trainer.generate(rows)
    batch = trainer.build_batch(rows, groups, trainer.score(rows, groups))
    return rows, groups, batch


def full_logprobs(model, prompt_ids, completion_ids):
    """log π(c_t | p, c_<t) [T] and log π(· | p, c_<t) [T+1, V] from full logits of the unpadded sequence."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    every = torch.log_softmax(logits[len(prompt_ids) - 1 :], dim=-1)
    taken = every[:-1].gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)
    return taken, every


@pytest.mark.parametrize("log_z,base_prior", [("scalar", False), ("prompt", False), ("scalar", True)])
def test_tb_loss_equals_independent_recomputation(trained_tiny_dir, tmp_path, log_z, base_prior):
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        loss="tb",
        log_z=log_z,
        log_z_init=1.5,
        reward_temperature_start=2.0,
        base_prior=base_prior,
    )
    model = trainer.model.eval()
    if log_z == "prompt":  # a non-trivial head, so the prompt's hidden state matters
        torch.nn.init.normal_(trainer.heads["log_z"].outer.weight, std=0.5)
    rows, groups, batch = one_batch(trainer)
    loss = trainer.loss(model, batch).value
    eos, floor = trainer.processing_class.eos_token_id, trainer.config.reward_floor
    expected = []
    for row, group in zip(rows, groups):
        for rollout in group:
            taken, _ = full_logprobs(model, rollout.prompt_ids, rollout.completion_ids)
            ids = rollout.completion_ids
            stops = ids[-1] == eos and not rollout.truncated
            log_r = math.log(max(float(is_correct(rollout.text, row)), floor)) if stops else math.log(floor)
            if base_prior and stops:  # the frozen base still equals the policy: log p_base(x⊤) = Σ log π
                log_r += taken.sum().item()
            if log_z == "scalar":
                z = 1.5
            else:
                with torch.no_grad():
                    out = model(input_ids=torch.tensor([rollout.prompt_ids]), output_hidden_states=True)
                    z = trainer.heads["log_z"](out.hidden_states[-1][0, -1]).item()
            expected.append((z + taken.sum().item() - log_r / 2.0) ** 2)
    assert len(expected) == 8
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_likelihood_rewards_and_modified_subtb_equal_recomputation(trained_tiny_dir, tmp_path):
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        loss="modified_subtb",
        reward="likelihood",
        reward_temperature_start=0.5,
    )
    model = trainer.model.eval()
    assert trainer.config.resolved_subtb_normalization() == "gfn-lm-tuning"  # modified SubTB's default
    rows, groups, batch = one_batch(trainer, prompts=1)
    loss = trainer.loss(model, batch).value
    tokenizer, template = trainer.processing_class, trainer.template
    marker = encode(tokenizer, template.answer_prefix)
    answer_ids = encode(tokenizer, rows[0]["answer"]) + [tokenizer.eos_token_id]
    sums, counts = [], []
    for i, rollout in enumerate(groups[0]):
        ids = rollout.completion_ids
        n = len(ids) - 1 if ids[-1] == tokenizer.eos_token_id else len(ids)
        taken, every = full_logprobs(model, rollout.prompt_ids, ids)
        log_terminal = every[:, tokenizer.eos_token_id]
        prefix_rewards = []
        for k in range(n + 1):
            z = ids[:k]
            for start in range(len(z) - len(marker) + 1):  # the trace part stops at the answer marker
                if z[start : start + len(marker)] == marker:
                    z = z[:start]
                    break
            answer_logp, _ = full_logprobs(model, list(rollout.prompt_ids) + z + marker, answer_ids)
            prefix_rewards.append(answer_logp.sum().item() / 0.5)
        stored = batch["prefix_log_reward"][i, : n + 1]
        assert stored.tolist() == pytest.approx(prefix_rewards, abs=1e-4)
        # naive double loop over subtrajectories, λ = 1
        flow = [prefix_rewards[k] - log_terminal[k].item() for k in range(n + 1)]
        terms = [
            (flow[a] + taken[a:b].sum().item() - flow[b]) ** 2
            for a in range(n + 1)
            for b in range(a + 1, n + 1)
        ]
        sums.append(sum(terms))
        counts.append(len(terms))
    assert len(set(counts)) > 1  # traces of different lengths: the two normalisations differ
    # gfn-lm-tuning: the group's pair terms over the group's number of pairs (λ = 1)
    assert loss.item() == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    # micro-batches that split the group: the divisor comes from the whole group, so the mean of the
    # halves' losses is the group's loss
    halves = [
        {k: v[part] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
        for part in (slice(0, 2), slice(2, 4))
    ]
    split = sum(trainer.loss(model, half).value.item() for half in halves) / 2
    assert split == pytest.approx(loss.item(), rel=1e-5)
    # sequence: each row over its own number of pairs, then the mean
    batch["subtb_log_norm"] = subtb_log_normalizer(batch["trace_mask"], 1.0, "sequence", batch["group"])
    per_sequence = [total / max(count, 1) for total, count in zip(sums, counts)]
    assert trainer.loss(model, batch).value.item() == pytest.approx(
        sum(per_sequence) / len(per_sequence), rel=1e-4
    )


@pytest.mark.parametrize("normalization", [None, "gfn-lm-tuning"])
def test_subtb_loss_uses_the_configured_pair_normalization(trained_tiny_dir, tmp_path, normalization):
    """`loss: subtb` (flow head): the loss is SubTB(λ) on the batch's flows, per sequence by default
    (torchgfn's geometric_within), over the prompt's samples with `gfn-lm-tuning`."""
    trainer = make_trainer(
        trained_tiny_dir, tmp_path / "run", loss="subtb", subtb_lambda=0.7, subtb_normalization=normalization
    )
    model = trainer.model.eval()
    torch.nn.init.normal_(trainer.heads["flow"].outer.weight, std=0.5)  # flows that differ by state
    _, _, batch = one_batch(trainer, prompts=1)
    loss = trainer.loss(model, batch).value.item()
    with torch.no_grad():
        log_pf, _, hidden = trainer.forward_terms(model, batch)
        flow = set_terminal_log_flow(trainer.heads["flow"](hidden), batch["tb_mask"], batch["log_reward"])
    tb_mask = batch["tb_mask"]
    lengths = tb_mask.sum(-1).long().tolist()
    assert len(set(lengths)) > 1
    sums, weights = [], []
    for b, n in enumerate(lengths):  # naive double loop over the pairs of row b
        terms = [
            (0.7 ** (j - i - 1), (flow[b, i] + log_pf[b, i:j].sum() - flow[b, j]).item() ** 2)
            for i in range(n)
            for j in range(i + 1, n + 1)
        ]
        sums.append(sum(w * t for w, t in terms))
        weights.append(sum(w for w, _ in terms))
    if normalization is None:
        expected = sum(s / w for s, w in zip(sums, weights)) / len(sums)
    else:
        expected = sum(sums) / sum(weights)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_log_z_group_replay_checkpoint_and_resume(trained_tiny_dir, tmp_path):
    config = dict(loss="tb", log_z_lr=0.2, replay_probability=0.5, tempered_probability=0.25)
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=4, **config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    group = trainer.side_parameters["heads"].param_group()
    log_z = trainer.heads["log_z"].value
    assert group["lr"] == 0.2 and group["params"] == [log_z] and group["weight_decay"] == 0.0
    assert all(log_z is not p for g in trainer.optimizer.param_groups if g is not group for p in g["params"])
    assert log_z.item() != 0.0 and log_z.grad is None  # moved; its gradient is cleared after each step
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    logs = [e for e in trainer.state.log_history if "gfn/log_z" in e]
    assert logs and {"loss", "gfn/var_logr_minus_logpf", "gfn/log_reward", "gfn/replay_fraction"} <= set(
        logs[0]
    )
    assert any("diversity/distinct_correct" in e and "diversity/pairwise" in e for e in logs)
    assert len(trainer.replay) > 0
    state = load_state_file(tmp_path / "run" / "checkpoint-4" / EXTRA_STATE.format(rank=0))
    assert state["side"]["heads"]["module"]["log_z.value"].item() == pytest.approx(log_z.item())
    assert state["extra"]["replay"] == trainer.replay.state_dict()
    # the base class's resume path restores heads and buffer (train(resume_from_checkpoint=...) calls it)
    resumed = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=4, **config)
    resumed.restore_checkpoint_state(tmp_path / "run" / "checkpoint-4")
    assert resumed.replay.state_dict() == trainer.replay.state_dict()
    assert resumed.heads["log_z"].value.item() == pytest.approx(log_z.item())
    assert resumed._micro_step == trainer._micro_step


def test_reward_temperature_schedule(trained_tiny_dir, tmp_path):
    assert reward_temperature_at(0, 1.1, 0.5, 150, "linear") == pytest.approx(1.1)
    assert reward_temperature_at(75, 1.1, 0.5, 150, "linear") == pytest.approx(0.8)
    assert reward_temperature_at(500, 1.1, 0.5, 150, "linear") == pytest.approx(0.5)
    assert reward_temperature_at(75, 1.1, 0.5, 150, "cosine") == pytest.approx(0.8)
    assert reward_temperature_at(25, 1.1, 0.5, 150, "cosine") == pytest.approx(
        0.5 + 0.6 * 0.5 * (1 + math.cos(math.pi / 6))
    )
    assert reward_temperature_at(40, 1.1, None, 150, "linear") == 1.1
    assert reward_temperature_at(40, 1.1, 0.5, 150, "constant") == 1.1
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        max_steps=10,
        reward_temperature_start=2.0,
        reward_temperature_end=1.0,
        reward_temperature_schedule="cosine",
    )
    trainer.state.global_step = 5  # the schedule runs over training.max_steps by default
    assert trainer.reward_temperature() == pytest.approx(1.5)
    _, _, warm = one_batch(trainer, prompts=1)
    trainer.state.global_step = 10
    assert trainer.reward_temperature() == 1.0
    _, _, cold = one_batch(trainer, prompts=1)
    floor = math.log(trainer.config.reward_floor)
    for batch, temperature in (
        (warm, 1.5),
        (cold, 1.0),
    ):  # log R / T_R with untempered log R ∈ {0, log floor}
        for value in (batch["log_reward"] * temperature).tolist():
            assert value == pytest.approx(0.0, abs=1e-6) or value == pytest.approx(floor)
    # the buffer keeps untempered log-rewards whatever T_R was when they entered
    assert all(
        e.log_reward in (0.0, pytest.approx(floor)) for b in trainer.replay.entries.values() for e in b
    )


def test_replay_buffer_dedup_top_k_and_round_trip(tmp_path):
    buffer = ReplayBuffer(capacity=3, edit_distance=0.25)
    row = {"prompt": "Q:1+2\nT:", "answer": "3"}

    def entry(ids, log_reward):
        return ReplayEntry(completion_ids=ids, text=str(ids), finish_reason="stop", log_reward=log_reward)

    assert buffer.add("p", row, entry([1, 2, 3, 4, 5, 6, 7, 8], -3.0))
    assert not buffer.add("p", row, entry([1, 2, 3, 4, 5, 6, 7, 8], -5.0))  # exact duplicate, worse
    assert buffer.add("p", row, entry([1, 2, 3, 4, 5, 6, 7, 8], -2.0))  # exact duplicate, better: updated
    assert len(buffer) == 1 and buffer.entries["p"][0].log_reward == -2.0
    assert not buffer.add(
        "p", row, entry([1, 2, 3, 4, 5, 6, 7, 9], -2.5)
    )  # 1 edit in 8: near duplicate, worse
    assert buffer.add("p", row, entry([1, 2, 3, 4, 5, 6, 9, 9], -1.0))  # 2 edits in 8: replaces it
    assert [e.completion_ids for e in buffer.entries["p"]] == [[1, 2, 3, 4, 5, 6, 9, 9]]
    for k, value in enumerate([-4.0, -3.0, -6.0, -0.5]):
        buffer.add("p", row, entry([10 + k] * 8, value))
    assert [e.log_reward for e in buffer.entries["p"]] == [-0.5, -1.0, -3.0]  # top 3 by log-reward
    assert not buffer.add("p", row, entry([30] * 8, -7.0))  # below the full buffer's minimum
    buffer.add("q", {"prompt": "other"}, entry([5], 0.0))
    assert sorted(buffer.prompts()) == ["p", "q"] and buffer.rows["p"] == row
    drawn = buffer.sample("p", 5, random.Random(0))
    assert len(drawn) == 5 and {tuple(e.completion_ids) for e in drawn} == {
        tuple(e.completion_ids) for e in buffer.entries["p"]
    }
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = ReplayBuffer()
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert restored.state_dict() == buffer.state_dict() and restored.capacity == 3


def test_edit_distances_match_a_naive_dynamic_program():
    def naive(a, b):
        table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = min(
                    table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
                )
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(30):
        query = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        others = [[rng.randrange(4) for _ in range(rng.randrange(0, 12))] for _ in range(5)]
        assert edit_distances(query, others).tolist() == [naive(query, o) for o in others]


def test_diversity_metrics_of_a_group():
    """`eval.metrics` (the trainer's diversity/* metrics): distinct correct answers up to whitespace, and
    1 − the mean difflib ratio 2M/(|a| + |b|) over pairs."""
    assert distinct_correct(["1+2", " 1 + 2", "2+1", None], [True, True, True, False]) == 2
    assert distinct_correct(["3", "4"], [False, False]) == 0
    assert pairwise_diversity(["abc", "abc"]) == 0.0 and pairwise_diversity(["abc"]) == 0.0
    assert pairwise_diversity(["ab", "cd"]) == 1.0
    # pairs: abcd/abxy share "ab" (ratio 0.5), abcd/abcd 1, abxy/abcd 0.5
    assert pairwise_diversity(["abcd", "abxy", "abcd"]) == pytest.approx(1 - (0.5 + 1.0 + 0.5) / 3)

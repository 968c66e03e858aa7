"""The online variational trainer's θ- and φ-steps against hand-computed losses on a tiny model.

Traces are written by hand (the reference solution, a corrupted one, one without the answer
marker), so the check needs no trained model: every log-probability below comes from one
unpadded full-logits forward, the weights from the formulas written out here, and the gradients
from autograd on those hand losses.
"""

import copy
import math

import pytest
import torch
from transformers import TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.data.templates import PlainTemplate, cut_trace, encode
from reasoning.models.tiny import build_tiny_model
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.variational_online import OnlineVariationalConfig, OnlineVariationalTrainer, Traces

K = 3  # traces per question
TEMPLATE = PlainTemplate()


def make_trainer(tmp_path, **config):
    model, tokenizer = build_tiny_model("1m", seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    values = dict(num_generations=K, estimator="gml", answer_samples=0, phi_max_grad_norm=None)
    trainer = OnlineVariationalTrainer(
        model=model,
        args=args,
        config=OnlineVariationalConfig(**{**values, **config}),
        train_dataset=load_records("synthetic:addition?digits=3&n=8&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[correctness],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=40, seed=0),
    )
    if not config.get("shared_posterior"):
        with torch.no_grad():  # q_φ ≠ π_θ, so the trace ratio is not 1
            for p in trainer.phi.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer, model, tokenizer


def hand_traces(trainer, rows, tokenizer):
    """Question 0: its reference trace, a corrupted trace, one without the answer marker.
    Question 1: three traces without the marker (no weight: the reference fallback)."""
    solution = encode(tokenizer, rows[0]["solution"])
    corrupted = list(solution)
    corrupted[2] = (
        encode(tokenizer, "9")[0] if corrupted[2] != encode(tokenizer, "9")[0] else encode(tokenizer, "1")[0]
    )
    ids = [solution, corrupted, solution[:4]] + [
        encode(tokenizer, rows[1]["solution"])[:n] for n in (3, 5, 7)
    ]
    valid = torch.tensor([True, True, False, False, False, False])
    return Traces(
        question=[0, 0, 0, 1, 1, 1],
        ids=ids,
        text=[tokenizer.decode(t) for t in ids],
        valid=valid,
        correct=torch.zeros(6, dtype=torch.bool),
        rewards=torch.zeros(6, 1),
    )


def token_logprobs(model, context, continuation):
    """log π(continuation_t | context, continuation_<t) from one unpadded full-logits forward."""
    ids = torch.tensor([list(context) + list(continuation)])
    logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)


def pieces(tokenizer, row, trace):
    marker = encode(tokenizer, TEMPLATE.answer_prefix)
    answer = encode(tokenizer, row["answer"]) + [tokenizer.eos_token_id]
    prior_prompt = encode(tokenizer, TEMPLATE.prior_prompt(row["question"]))
    posterior_prompt = encode(tokenizer, TEMPLATE.posterior_prompt(row["question"], row["answer"]))
    return prior_prompt, posterior_prompt, list(trace) + marker, answer


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_theta_step_gradient_is_the_weighted_nll_of_eq8(tmp_path):
    trainer, model, tokenizer = make_trainer(tmp_path)
    rows = [trainer.train_dataset[i] for i in range(2)]
    traces = hand_traces(trainer, rows, tokenizer)

    micro = trainer.theta_micro_batches(rows, traces)
    assert len(micro) == trainer.args.gradient_accumulation_steps
    model.zero_grad()
    total = 0.0
    for batch in micro:
        loss = trainer.loss(model, batch).value
        loss.backward()
        total += loss.item()
    trainer_grads = grads(model)

    # by hand: log ρ_k = (log π(z_k|x) − log q(z_k|x,y′))/|z_k| + mean_t log π(y*_t|x,z_k), softmax over k
    model.zero_grad()
    phi = trainer.phi
    log_rho, joint = [], []
    for q, trace, valid in zip(traces.question, traces.ids, traces.valid.tolist()):
        prior_prompt, posterior_prompt, z, y = pieces(tokenizer, rows[q], trace)
        full = token_logprobs(model, prior_prompt, z + y)
        with torch.no_grad():
            log_q = token_logprobs(phi, posterior_prompt, z).sum()
        log_pz, log_py = full[: len(z)].sum(), full[len(z) :]
        value = (log_pz.detach() - log_q) / len(z) + log_py.detach().mean()
        log_rho.append(value if valid else torch.tensor(-math.inf))
        joint.append(full.sum())
    log_rho = torch.stack(log_rho).view(2, K)
    rho = torch.exp(log_rho[0] - torch.logsumexp(log_rho[0], dim=0))  # question 0; question 1 has none
    hand = -(rho * torch.stack(joint[:K])).sum()
    # question 1 falls back to its reference solution, weight 1
    prior_prompt, _, z, y = pieces(tokenizer, rows[1], encode(tokenizer, rows[1]["solution"]))
    hand = hand - token_logprobs(model, prior_prompt, z + y).sum()
    hand = hand / 2  # mean over the Q = 2 questions
    hand.backward()

    assert math.isclose(total, hand.item(), rel_tol=1e-4)
    for got, want in zip(trainer_grads, grads(model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.isclose(rho.sum(), torch.tensor(1.0)) and rho[2] == 0 and 0 < rho[0] < 1


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
def test_phi_step_gradient(tmp_path, objective):
    """Forward KL (Eq. 9): −(1/Q) Σ w̃_m log q(z_m, y|x, y′), w̃ = softmax of the GML estimator over
    valid traces. Reverse KL: −(1/Q) Σ (r_k − r̄) log q(z_k|x, y′), r = log π(z, y*|x) − log q(z|x, y′)."""
    trainer, model, tokenizer = make_trainer(tmp_path, posterior_objective=objective)
    rows = [trainer.train_dataset[i] for i in range(2)]
    traces = hand_traces(trainer, rows, tokenizer)
    phi = trainer.phi
    before = copy.deepcopy(phi)
    # plain SGD with learning rate 1: the parameter change is exactly minus the gradient
    trainer.side_parameters["phi"].optimizer = torch.optim.SGD(phi.parameters(), lr=1.0)
    trainer.phi_update(rows, traces)
    assert trainer.phi_updates == 1
    change = [b.detach() - a.detach() for b, a in zip(before.parameters(), phi.parameters())]

    terms = []
    for q in range(2):
        scores, log_qs = [], []
        for k in range(K):
            i = q * K + k
            prior_prompt, posterior_prompt, z, y = pieces(tokenizer, rows[q], traces.ids[i])
            with torch.no_grad():
                prior = token_logprobs(model, prior_prompt, z + y)
                log_q_trace = token_logprobs(before, posterior_prompt, z).sum()
            if objective == "forward_kl":
                scores.append(prior[len(z) :].mean() if traces.valid[i] else torch.tensor(-math.inf))
                log_qs.append(token_logprobs(before, posterior_prompt, z + y).sum())
            else:
                scores.append(prior.sum() - log_q_trace)
                log_qs.append(token_logprobs(before, posterior_prompt, z).sum())
        scores = torch.stack(scores)
        if objective == "forward_kl":
            if torch.isinf(scores).all():
                continue  # no trace of this question reached the answer: no signal
            weights = torch.exp(scores - torch.logsumexp(scores, dim=0))
        else:
            weights = scores - scores.mean()
        terms.append(-(weights * torch.stack(log_qs)).sum())
    hand = torch.stack(terms).sum() / 2
    before.zero_grad()
    hand.backward()
    wanted = [p.grad if p.grad is not None else torch.zeros_like(p) for p in before.parameters()]
    # float32 rounding of φ − g is relative to the largest gradient (the reverse-KL rewards are large)
    scale = max(w.abs().max() for w in wanted)
    for got, want in zip(change, wanted):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * scale)
    assert model is not phi and any(g.abs().max() > 0 for g in change)


def test_posterior_update_without_signal_leaves_phi_alone(tmp_path):
    trainer, _, tokenizer = make_trainer(tmp_path)
    rows = [trainer.train_dataset[i] for i in range(2)]
    traces = hand_traces(trainer, rows, tokenizer)
    traces.valid[:] = False
    before = [p.detach().clone() for p in trainer.phi.parameters()]
    trainer.phi_update(rows, traces)
    assert trainer.phi_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.phi.parameters()))


def test_models_and_engines(tmp_path):
    trainer, model, _ = make_trainer(tmp_path)
    assert trainer.phi is not model
    # hf: each model has its own engine around the live model, so sampling q never overwrites θ
    assert trainer.posterior_engine is not trainer.engine and trainer.posterior_engine.model is trainer.phi
    shared, model, _ = make_trainer(tmp_path, shared_posterior=True)
    assert shared.phi is model and shared.posterior_engine is shared.engine
    assert shared._weights_version("phi") == shared._weights_version("theta")
    assert "phi" not in shared.trainer_extra_state()


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="estimator must be one of"):
        OnlineVariationalConfig(estimator="accuracy")
    with pytest.raises(ValueError, match="posterior_objective"):
        OnlineVariationalConfig(posterior_objective="kl")
    with pytest.raises(ValueError, match="answer_samples >= 1"):
        OnlineVariationalConfig(estimator="acc", answer_samples=0)
    with pytest.raises(ValueError, match="remove posterior_path"):
        OnlineVariationalConfig(shared_posterior=True, posterior_path="somewhere")
    with pytest.raises(ValueError, match="num_iterations must be 1"):
        OnlineVariationalConfig(num_iterations=2)


def test_one_engine_is_resynced_between_the_models(tmp_path):
    """The vLLM arrangement (one engine with its own copy of the weights, shared by θ and φ), here with
    an HFEngine that loads its own copy: the engine holds whichever model is asked for, synced lazily."""
    build_tiny_model("1m", path=tmp_path / "init", seed=0)
    engine = HFEngine(str(tmp_path / "init"))
    trainer, model, _ = make_trainer(tmp_path)
    trainer.engine = trainer.posterior_engine = engine

    def holds(module):
        return all(
            torch.equal(a, b)
            for a, b in zip(engine.model.state_dict().values(), module.state_dict().values())
        )

    trainer.engine_for("phi")
    assert holds(trainer.phi) and not holds(model)
    count = trainer.sync_count
    trainer.engine_for("phi")
    assert trainer.sync_count == count  # φ unchanged: no second sync
    trainer.engine_for("theta")
    assert holds(model) and not holds(trainer.phi) and trainer.sync_count == count + 1
    with torch.no_grad():
        next(trainer.phi.parameters()).add_(1.0)
    trainer.side_parameters["phi"].steps += 1
    trainer.engine_for("phi")
    assert holds(trainer.phi) and trainer.sync_count == count + 2


def test_split_trace_cuts_at_the_last_marker_and_drops_the_stop_token():
    marker, eos = [7, 8], 1

    def split_trace(ids, marker, stop_ids, stopped):  # the trainer's cut: the last marker
        cut = cut_trace(ids, marker, stop_ids, truncated=not stopped, at="last")
        return cut.trace, cut.marker_found

    assert split_trace([3, 7, 8, 4, 7, 8, 5, eos], marker, {eos}, stopped=True) == ([3, 7, 8, 4], True)
    assert split_trace([3, 4, eos], marker, {eos}, stopped=True) == ([3, 4], False)
    assert split_trace([3, 4, eos], marker, {eos}, stopped=False) == ([3, 4, eos], False)  # truncated: kept
    assert split_trace([3, 7, 8], [], {eos}, stopped=False) == ([3, 7, 8], False)


def test_the_trainer_cuts_its_traces_before_the_last_marker_text(tmp_path):
    """`TraceCutter(at="last")` on the tiny tokenizer: the trace ends before the last `\\nA:`, whose own text
    is kept for the answer layout; no marker: the whole completion (stop token dropped) and not valid."""
    trainer, _, tokenizer = make_trainer(tmp_path)
    eos = tokenizer.eos_token_id
    cut = trainer.cutter(encode(tokenizer, "1+2=3\nA:3\nA:4") + [eos], truncated=False)
    assert cut.trace == encode(tokenizer, "1+2=3\nA:3") and cut.marker == "\nA:" and cut.marker_count == 2
    none = trainer.cutter(encode(tokenizer, "1+2=3") + [eos], truncated=False)
    assert none.trace == encode(tokenizer, "1+2=3") and none.missing and none.marker is None

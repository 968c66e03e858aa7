"""Token-budget micro-batches and packed rows give the gradient of the padded full-batch step.

The bookkeeping alone (`microbatch_loss` on a float64 per-token loss) is exact to float64 rounding.
Through a real tiny Qwen2 (transformers), the clipped GRPO surrogate over 7 sequences of very
different lengths, aggregated with grpo / dapo / dr_grpo, is differentiated (a) as one padded batch
(left-padded prompts, right-padded completions, as the trainer collates them), (b) as length-sorted
micro-batches of unequal sizes, each trimmed to its own width, and (c) as packed rows (one row of
concatenated sequences per micro-batch, positions restarting at 0, no mask). Each micro-batch's loss
is its share of the whole batch's. The gradients agree to 1e-6 of the largest entry, in float32 and
in float64 alike: RoPE's cos/sin (transformers) and the log-prob head (`token_logprobs_from_hidden`)
run in float32 whatever the model's dtype, and each layout puts a token at another absolute position
(left padding shifts it), so float32 rounding differs by layout; a per-micro-batch mean instead of the
share is off by more than 1e-3 (checked below). Eager attention is run in float32 only: it adds a
float64 mask's minimum in a float32 softmax, which makes fully padded rows NaN.
"""

import pytest
import torch
from transformers import Qwen2ForCausalLM

from reasoning.models.packing import packed_inputs, packed_token_logprobs, packing_support, verify_packing
from reasoning.models.scoring import Warpers, completion_logprobs
from reasoning.models.tiny import tiny_config
from reasoning.objectives.policy import aggregate_loss, clipped_surrogate, microbatch_loss
from reasoning.trainers.microbatch import plan_microbatches, slice_rows

PROMPTS = [3, 6, 4, 5, 3, 6, 2]
COMPLETIONS = [1, 14, 2, 9, 5, 3, 11]
MAX_COMPLETION_LENGTH = 16
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def tiny_model(attention: str, dtype=torch.float64) -> Qwen2ForCausalLM:
    config = tiny_config("1m", vocab_size=258)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype)


def collated_batch(dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The trainer's layout: prompts left-padded, completions right-padded (pad id 0), with the
    π_old log-probs and advantages a GRPO micro-batch carries."""
    generator = torch.Generator().manual_seed(1)
    n, p_width, c_width = len(PROMPTS), max(PROMPTS), max(COMPLETIONS)
    prompt_ids = torch.zeros((n, p_width), dtype=torch.long)
    completion_ids = torch.zeros((n, c_width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        prompt_ids[i, p_width - p :] = torch.randint(2, 258, (p,), generator=generator)
        completion_ids[i, :c] = torch.randint(2, 258, (c,), generator=generator)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": (prompt_ids != 0).long(),
        "completion_ids": completion_ids,
        "completion_mask": (completion_ids != 0).long(),
        "advantages": torch.randn(n, generator=generator, dtype=dtype),
        # old log-probs away from the current ones, so that ratios differ from 1 and some clip
        "old_logprobs": -5.5 + 0.4 * torch.randn((n, c_width), generator=generator, dtype=dtype),
    }


def padded_logprobs(model, batch):
    """As `RolloutTrainer.policy_logprobs` computes them (`completion_logprobs`: final states,
    chunked head)."""
    return completion_logprobs(model, batch)[0]


def packed_logprobs(model, batch):
    packed = packed_inputs(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    return packed_token_logprobs(model, packed, batch["completion_ids"])[0]


def surrogate(logp, batch):
    per_token, _ = clipped_surrogate(logp, batch["old_logprobs"], batch["advantages"], mask=batch["completion_mask"])
    return per_token


def gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def full_batch_gradient(model, batch, loss_type):
    model.zero_grad()
    mask = batch["completion_mask"]
    loss = aggregate_loss(
        surrogate(padded_logprobs(model, batch), batch),
        mask,
        loss_type,
        max_completion_length=MAX_COMPLETION_LENGTH,
        normalizer=mask.sum(),
    )
    loss.backward()
    return loss.detach(), gradient(model)


def split_gradient(model, batch, loss_type, plan, logprobs=padded_logprobs):
    """Backward per micro-batch, each loss its share of the whole batch's."""
    model.zero_grad()
    total = torch.zeros((), dtype=batch["old_logprobs"].dtype)
    sequences, tokens = len(PROMPTS), batch["completion_mask"].sum()
    for micro in plan:
        part = slice_rows(batch, micro.indices)
        loss = microbatch_loss(
            surrogate(logprobs(model, part), part),
            part["completion_mask"],
            loss_type,
            num_sequences=sequences,
            num_tokens=tokens,
            max_completion_length=MAX_COMPLETION_LENGTH,
        )
        loss.backward()
        total = total + loss.detach()
    return total, gradient(model)


def lengths():
    return [p + c for p, c in zip(PROMPTS, COMPLETIONS)]


def bucketed_plan():
    plan = plan_microbatches(lengths(), 40, prompt_lengths=PROMPTS)
    # unequal micro-batches (sequences and tokens), each trimmed narrower than the full batch
    assert len(plan) >= 3 and len({len(m.indices) for m in plan}) > 1 and len({m.tokens for m in plan}) > 1
    return plan


def packed_plan():
    plan = plan_microbatches(lengths(), 24, packed=True)
    assert len(plan) >= 3 and any(len(m.indices) > 1 for m in plan)
    return plan


@pytest.mark.parametrize("loss_type", ["grpo", "sequence_mean", "dapo", "token_mean", "dr_grpo", "sequence_sum"])
def test_micro_batch_shares_sum_to_the_full_batch_loss_and_gradient_exactly(loss_type):
    generator = torch.Generator().manual_seed(3)
    batch = collated_batch()
    mask = batch["completion_mask"]
    theta = torch.randn(mask.shape, generator=generator, dtype=torch.float64, requires_grad=True)

    def per_token(rows):  # a nonlinear per-token loss of the parameters
        return torch.sin(theta[rows]) * theta[rows] ** 2

    everyone = torch.arange(len(PROMPTS))
    full = aggregate_loss(per_token(everyone), mask, loss_type, MAX_COMPLETION_LENGTH, normalizer=mask.sum())
    (reference,) = torch.autograd.grad(full, theta)
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(theta)
    for micro in bucketed_plan():
        rows = torch.tensor(micro.indices)
        share = microbatch_loss(
            per_token(rows), mask[rows], loss_type, num_sequences=len(PROMPTS), num_tokens=mask.sum(),
            max_completion_length=MAX_COMPLETION_LENGTH,
        )  # fmt: skip
        grad += torch.autograd.grad(share, theta)[0]
        total += share.detach()
    assert torch.allclose(total, full, rtol=1e-14, atol=0)
    assert torch.allclose(grad, reference, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize(
    ("attention", "dtype"),
    [("sdpa", torch.float64), ("sdpa", torch.float32), ("eager", torch.float32)],
    ids=["sdpa-float64", "sdpa-float32", "eager-float32"],
)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bucketed_and_packed_steps_have_the_full_batch_gradient(attention, dtype, loss_type):
    model, batch = tiny_model(attention, dtype), collated_batch(dtype)
    loss, reference = full_batch_gradient(model, batch, loss_type)
    assert reference.abs().max() > 1e-2  # a real gradient, not zeros
    for plan, logprobs in ((bucketed_plan(), padded_logprobs), (packed_plan(), packed_logprobs)):
        split_loss, split = split_gradient(model, batch, loss_type, plan, logprobs)
        assert abs(float(split_loss - loss)) <= 1e-6 * abs(float(loss))
        assert (split - reference).abs().max() <= 1e-6 * reference.abs().max()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_averaging_each_micro_batch_on_its_own_is_not_the_full_batch_gradient(loss_type):
    """What the share fixes: a micro-batch mean / number of micro-batches (exact only for equal
    micro-batches) moves the gradient when micro-batches differ in sequences and tokens."""
    model, batch = tiny_model("sdpa"), collated_batch()
    _, reference = full_batch_gradient(model, batch, loss_type)
    plan = bucketed_plan()
    model.zero_grad()
    for micro in plan:
        part = slice_rows(batch, micro.indices)
        mask = part["completion_mask"]
        mean = aggregate_loss(surrogate(padded_logprobs(model, part), part), mask, loss_type, normalizer=mask.sum())
        (mean / len(plan)).backward()
    assert (gradient(model) - reference).abs().max() > 1e-3 * reference.abs().max()


def test_bnpo_has_no_share_form():
    with pytest.raises(ValueError, match="use dapo"):
        microbatch_loss(torch.ones(2, 3), torch.ones(2, 3), "bnpo", num_sequences=4, num_tokens=12)


@pytest.mark.parametrize("attention", ["eager", "sdpa", "flex_attention"])
def test_packed_sequences_see_exactly_what_they_see_alone(attention):
    assert verify_packing(tiny_model(attention, torch.float32)) < 1e-4


def test_verify_packing_catches_a_backend_that_lets_packed_sequences_attend_to_each_other(monkeypatch):
    import transformers.masking_utils as masking

    # a transformers that no longer finds the sequence boundaries in the positions
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(RuntimeError, match="does not keep packed sequences apart"):
        verify_packing(tiny_model("sdpa", torch.float32))


def test_packing_support_names_backends_without_a_packed_mask():
    model = tiny_model("eager", torch.float32)
    assert packing_support(model) is None
    model.config._attn_implementation = "paged|sdpa"
    reason = packing_support(model)
    assert reason is not None and "paged|sdpa" in reason and "bucketed" in reason
    with pytest.raises(ValueError, match="paged"):
        verify_packing(model)


def test_packed_inputs_lay_out_sequences_and_index_the_predicting_states():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    completion_ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    packed = packed_inputs(prompt_ids, (prompt_ids != 0).long(), completion_ids, (completion_ids != 0).long())
    assert packed.input_ids.tolist() == [[5, 6, 1, 2, 7, 8, 9, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.lengths == [4, 4]
    # token 1 (position 2) is predicted by position 1, token 3 (position 7) by position 6
    assert packed.state_index.tolist() == [[1, 2, 0], [6, 0, 0]]
    assert packed.completion_mask.tolist() == [[True, True, False], [True, False, False]]
    with pytest.raises(ValueError, match="no prompt"):
        packed_inputs(torch.zeros((1, 2), dtype=torch.long), torch.zeros((1, 2), dtype=torch.long),
                      completion_ids[:1], (completion_ids[:1] != 0).long())  # fmt: skip


def test_packed_log_probs_and_entropies_are_the_padded_ones_at_the_sampling_warpers():
    model, batch = tiny_model("sdpa"), collated_batch()
    warpers = Warpers(temperature=0.7, top_k=20)
    padded, padded_entropy = completion_logprobs(model, batch, warpers, with_entropy=True)
    packed = packed_inputs(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    logp, entropy = packed_token_logprobs(model, packed, batch["completion_ids"], warpers, with_entropy=True)
    mask = batch["completion_mask"].bool()
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    # random tokens mostly fall outside the top 20 (−inf): the same ones on both paths
    finite = torch.isfinite(padded)
    assert torch.equal(torch.isfinite(logp), finite) and 0 < finite[mask].sum() < mask.sum()
    assert torch.allclose(logp[finite], padded[finite], rtol=0, atol=1e-6)
    assert torch.allclose(entropy, padded_entropy, rtol=0, atol=1e-6)

"""Inference scaling (BiN, best-of-N, majority) on a real tiny model, the hf and vLLM engines, and the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.templates import encode, template_for
from reasoning.eval.scaling import (
    answer_key,
    answer_loglik,
    bin_scores,
    default_ns,
    distinct_correct,
    pairwise_diversity,
    scaling_eval,
    select_bin,
    select_bon,
    select_majority,
)
from reasoning.rollout.hf import HFEngine


def test_selectors_disagree_as_they_should():
    # rationale 0 is confident in its own answer "7"; under every rationale "8" is better on average
    loglik = torch.tensor([[-0.1, -0.5], [-5.0, -0.4], [-6.0, -0.2]])  # [Z, A], answers ["7", "8"]
    keys = ["7", "8", "8"]
    own = [loglik[0, 0].item(), loglik[1, 1].item(), loglik[2, 1].item()]
    assert select_bon(own, keys) == 0
    assert select_bin(loglik) == 1 and bin_scores(loglik).tolist() == pytest.approx([-11.1 / 3, -1.1 / 3])
    assert select_majority(keys) == 1 and select_majority(["3", "4", None, "4"]) == 1
    assert select_majority([None, None]) is None and select_bon([0.0], [None]) is None
    assert select_majority(["5", "6"]) == 0  # ties: the first seen
    assert distinct_correct(["1+2", " 1 + 2", "2+1", None], [True, True, True, False]) == 2
    assert answer_key(" 3 * 5 ") == "3*5"
    assert pairwise_diversity(["abc", "abc"]) == 0.0 and pairwise_diversity(["abc"]) == 0.0
    assert 0 < pairwise_diversity(["abcd", "abxy", "zzzz"]) <= 1
    assert default_ns(16) == [4, 8, 16] and default_ns(8) == [4, 8] and default_ns(2) == [2]


def naive_answer_loglik(model, prompt_ids, rationale_ids, marker_ids, answer_ids):
    """Mean log-prob of the answer tokens after prompt, rationale and answer marker, from full logits."""
    ids = list(prompt_ids) + list(rationale_ids) + list(marker_ids) + list(answer_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    start = len(ids) - len(answer_ids)
    logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(answer_ids).unsqueeze(-1)).mean().item()


def test_bin_scores_equal_an_independent_recomputation(trained_tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    engine = HFEngine(model=model, tokenizer=tokenizer)
    results = scaling_eval(
        str(trained_tiny_dir),
        ["addition"],
        ns=(2, 4),
        limit=3,
        temperature=1.0,
        max_tokens=40,
        engine=engine,
        output_dir=tmp_path / "scaling",
    )
    metrics = results["benchmarks"]["addition"]
    for n in (2, 4):
        assert {
            f"bin@{n}",
            f"bon@{n}",
            f"majority@{n}",
            f"avg@{n}",
            f"pass@{n}",
            f"distinct_correct@{n}",
        } <= set(metrics)
        for method in ("bin", "bon", "majority"):
            assert 0 <= metrics[f"{method}@{n}"] <= metrics[f"pass@{n}"]  # a pick is one of the N answers
    assert (
        json.loads((tmp_path / "scaling" / "results.json").read_text())["benchmarks"]["addition"] == metrics
    )
    lines = [json.loads(x) for x in (tmp_path / "scaling" / "samples.jsonl").read_text().splitlines()]
    reasons = [reason for line in lines for reason in line["finish_reasons"]]
    assert len(reasons) == 3 * 4 and metrics["truncated_share"] == reasons.count("length") / len(reasons)
    lines = [json.loads(x) for x in (tmp_path / "scaling" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    template = template_for(tokenizer)
    marker = encode(tokenizer, template.answer_prefix)
    checked = 0
    for line in lines:
        prompt = encode(tokenizer, template.prior_prompt(line["question"], tokenizer))
        # the char-level tokenizer re-encodes a rationale's text to the generated ids
        rationales = [encode(tokenizer, text.split(template.answer_prefix)[0]) for text in line["rationales"]]
        by_key = {answer_key(a): a for a in line["answers"] if a is not None}
        matrix = torch.tensor(line["matrix"])
        for i, z in enumerate(rationales):
            for j, key in enumerate(line["candidates"]):
                answer_ids = encode(tokenizer, by_key[key]) + [tokenizer.eos_token_id]
                expected = naive_answer_loglik(model, prompt, z, marker, answer_ids)
                assert matrix[i, j].item() == pytest.approx(expected, abs=1e-4)
                checked += 1
        if line["candidates"]:
            # BiN at N = 4: mean over the rationales, argmax over the distinct answers
            best = max(range(len(line["candidates"])), key=lambda j: matrix[:, j].mean().item())
            assert (
                line["picked"]["4"]["bin"]
                == line["correct"][line["answers"].index(by_key[line["candidates"][best]])]
            )
    assert checked > 0
    # the low-level scorer agrees too
    z = rationales[0]
    value = answer_loglik(model, tokenizer, template, prompt, [(z, "123")])[0]
    assert value == pytest.approx(
        naive_answer_loglik(model, prompt, z, marker, encode(tokenizer, "123") + [1]), abs=1e-4
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_scaling_with_the_vllm_engine(trained_tiny_dir, vllm_engine):
    results = scaling_eval(
        str(trained_tiny_dir), ["addition"], ns=(4, 8), limit=8, max_tokens=40, engine=vllm_engine
    )
    metrics = results["benchmarks"]["addition"]
    assert metrics["problems"] == 8 and results["engine"] == "VLLMEngine"
    for method in ("bin", "bon", "majority"):
        assert 0 <= metrics[f"{method}@8"] <= metrics["pass@8"]
    assert results["max_model_len"] == 256 and 0 <= metrics["truncated_share"] <= 1
    # rationale budget + the answer decoded after it must fit the engine's 256 tokens: refused up front
    with pytest.raises(ValueError, match=r"new tokens plus \d+ to decode the answer.*max_model_len of 256"):
        scaling_eval(str(trained_tiny_dir), ["addition"], ns=(4,), limit=2, max_tokens=230, engine=vllm_engine)


def test_cli_scaling(trained_tiny_dir, tmp_path, run_cli):
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "--model",
        str(trained_tiny_dir),
        "--benchmarks",
        "addition",
        "--limit",
        "3",
        "--n",
        "4",
        "--max-tokens",
        "40",
        "--scaling",
        "bin,bon,majority",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["scaling"]["ns"] == [4] and results["scaling"]["temperature"] == 1.0
    assert {"bin@4", "bon@4", "majority@4", "pass@4"} <= set(results["benchmarks"]["addition"])
    bad = run_cli("eval", "--model", str(trained_tiny_dir), "--benchmarks", "addition", "--scaling", "best")
    assert bad.returncode == 2 and "unknown scaling method" in bad.stderr

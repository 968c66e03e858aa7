"""Engine construction and sampling settings fail clearly on bad input."""

import pytest

from reasoning.rollout import Sampling, make_engine


def test_make_engine_rejects_unknown_and_unavailable_kinds():
    with pytest.raises(ValueError, match="choose one of hf, vllm, vllm-server"):
        make_engine("sglang", "x")
    with pytest.raises(ValueError, match="weight_sync 'rsync' is not one of checkpoint, nccl"):
        make_engine("vllm-server", "x", weight_sync="rsync")


def test_sampling_validates_its_fields():
    assert Sampling(temperature=0).greedy
    for bad, message in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            Sampling(**bad)

"""The shipped accelerate launch configs parse, and say what their names promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"

EXPECTED = {
    # name: (distributed type, ZeRO stage or None, offload device, machines)
    "single_gpu": (DistributedType.NO, None, None, 1),
    "multi_gpu": (DistributedType.MULTI_GPU, None, None, 1),
    "zero2": (DistributedType.DEEPSPEED, 2, "none", 1),
    "zero3": (DistributedType.DEEPSPEED, 3, "none", 1),
    "zero3_offload": (DistributedType.DEEPSPEED, 3, "cpu", 1),
    "multi_node_zero3": (DistributedType.DEEPSPEED, 3, "none", 2),
}


def test_every_config_is_expected():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    kind, stage, offload, machines = EXPECTED[name]
    assert config.distributed_type == kind
    assert config.num_machines == machines
    assert not config.use_cpu  # on CPU, ACCELERATE_USE_CPU=1 selects gloo (docs/distributed.md)
    if stage is None:
        assert not config.deepspeed_config
        return
    ds = config.deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == offload and ds["offload_param_device"] == offload
    if stage == 3:  # consolidated checkpoints that load as plain transformers models
        assert ds["zero3_save_16bit_model"] is True and ds["zero3_init_flag"] is True

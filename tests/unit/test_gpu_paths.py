"""GPU paths that cannot run here, checked through their decision logic (issue 20, part B).

- Launch mixed precision vs `training.bf16` under DeepSpeed, with the environment `accelerate launch`
  itself prepares from every shipped config (`recipes/accelerate/*.yaml`), paired with every recipe.
- The variational pipeline refuses several processes and DeepSpeed, before writing anything.
- The colocated engine's executor backend: tensor parallelism only through `external_launcher`.
- LOCAL_RANK fallback: the process's index on its machine, not the global rank (a real 2-process
  gloo group whose ranks report different host names, as on two nodes).
- The GRPO-step benchmark's device choice and GPU memory report.

Mocked: only the GPU (torch.cuda functions) where a test needs one.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reasoning.recipes import RecipeError, check_launch, check_launch_precision, check_recipe, load_recipe
from reasoning.rollout.vllm_engine import (
    executor_backend,
    iter_full_weights,
    local_index_among_hosts,
    local_process_index,
)
from reasoning.trainers.variational import single_process_problem

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
DEMO = sorted((RECIPES / "demo").glob("*.yaml"))
PAPERS = sorted((RECIPES / "papers").glob("*.yaml"))
LAUNCH_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher variables from the environment the tests run in."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------- 1. launch mixed precision


def accelerate_env(config: str | Path, *flags: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG FLAGS -m reasoning train` gives its
    processes, computed by accelerate's own launch code (accelerate/commands/launch.py,
    `launch_command`: validate, then the DeepSpeed / multi-GPU / simple launcher's environment).
    WORLD_SIZE is what torchrun then sets in each process of a multi-process launch."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), *flags, "-m", "reasoning", "train", "RECIPE.yaml"]
    )
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        if mixed_precision_from_config:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu and not args.cpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    processes = int(args.num_processes or 1)
    if processes > 1 and (args.use_deepspeed or args.multi_gpu):
        env["WORLD_SIZE"] = str(processes)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_") or k == "WORLD_SIZE"}


def test_accelerate_exports_the_configs_mixed_precision():
    """The real interface: what the check reads is what accelerate's launcher writes."""
    env = accelerate_env(RECIPES / "accelerate" / "zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["WORLD_SIZE"] == "8"
    assert accelerate_env(RECIPES / "accelerate" / "zero3.yaml", "--mixed_precision", "no")[
        "ACCELERATE_MIXED_PRECISION"
    ] == "no"
    assert "ACCELERATE_USE_DEEPSPEED" not in accelerate_env(RECIPES / "accelerate" / "multi_gpu.yaml")


def test_deepspeed_bf16_launch_without_training_bf16_fails_in_the_recipe_check(clean_launch_env):
    clean_launch_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch` with zero3.yaml
    clean_launch_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    recipe = load_recipe(RECIPES / "demo" / "sft.yaml")  # fp32, a tiny model: every other check passes
    with pytest.raises(RecipeError) as error:
        check_recipe(recipe)
    message = str(error.value)
    assert "ACCELERATE_MIXED_PRECISION=bf16" in message and "training.bf16: true" in message
    assert "--mixed_precision no" in message and "ds bf16.enabled=True vs hf bf16" in message
    clean_launch_env.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(RecipeError, match=r"training\.fp16: true"):
        check_recipe(recipe)


def test_precision_check_decisions():
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true"}
    check_launch_precision({"bf16": True}, {**deepspeed, "ACCELERATE_MIXED_PRECISION": "bf16"})
    check_launch_precision({}, {**deepspeed, "ACCELERATE_MIXED_PRECISION": "no"})  # fp32 DeepSpeed
    check_launch_precision({"bf16": True}, {**deepspeed, "ACCELERATE_MIXED_PRECISION": "no"})  # the recipe decides
    check_launch_precision({}, {"ACCELERATE_MIXED_PRECISION": "bf16"})  # DDP: transformers lets the launch decide
    with pytest.raises(RecipeError, match=r"trains in bf16 \(training\.fp16: false\)"):
        check_launch_precision({"bf16": True}, {**deepspeed, "ACCELERATE_MIXED_PRECISION": "fp16"})
    # a DeepSpeed config in the recipe: explicit values are compared (transformers' fill_match), auto is filled
    check_launch_precision({"deepspeed": {"bf16": {"enabled": "auto"}}}, {})
    check_launch_precision({"deepspeed": {"bf16": {"enabled": True}}, "bf16": True}, {})
    with pytest.raises(RecipeError, match=r"sets bf16\.enabled: True but training\.bf16 is False"):
        check_launch_precision({"deepspeed": {"bf16": {"enabled": True}}}, {})
    with pytest.raises(RecipeError, match=r"ACCELERATE_MIXED_PRECISION=bf16"):  # torchrun + recipe config + env
        check_launch_precision({"deepspeed": {"zero_optimization": {"stage": 2}}}, {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_deepspeed_config_file_is_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(RecipeError, match=r"sets fp16\.enabled: True but training\.fp16 is False"):
        check_launch_precision({"deepspeed": str(path)}, {})
    check_launch_precision({"deepspeed": str(path), "fp16": True}, {})


def documented_launch(recipe: Path) -> tuple[str, list[str]]:
    """The launch a paper recipe's header recommends: (accelerate config, extra flags)."""
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    match = re.search(r"accelerate launch --config_file (\S+)", header)
    assert match, f"{recipe.name} names no launch line"
    return match.group(1), []


def trains_in_bf16(path: Path) -> bool:
    return bool((yaml.safe_load(path.read_text()).get("training") or {}).get("bf16"))


# (recipe, accelerate config, flags, expected: None = passes, else a regex of the RecipeError)
PAIRINGS = [
    # docs/distributed.md, "On a CPU machine": DDP with --mixed_precision no, 2 processes
    *[
        (
            path,
            "multi_gpu.yaml",
            ["--num_processes", "2", "--mixed_precision", "no"],
            "runs in one process" if path.stem == "variational" else None,
        )
        for path in DEMO
    ],
    # one GPU (bf16 autocast, not DeepSpeed): any recipe
    *[(path, "single_gpu.yaml", [], None) for path in DEMO],
    # the ZeRO configs as shipped (bf16) with recipes that train in fp32
    *[
        (
            path,
            "zero3.yaml",
            ["--num_processes", "1"],
            "not run under DeepSpeed"
            if path.stem == "variational"
            else None
            if trains_in_bf16(path)
            else r"training\.bf16: true",
        )
        for path in DEMO
    ],
    *[(path, "zero2.yaml", ["--num_processes", "2", "--mixed_precision", "no"], None) for path in DEMO if path.stem != "variational"],
    # every paper recipe with the launch its header gives, and the variational ones with the ZeRO-3 line they used to give
    *[(path, None, [], None) for path in PAPERS],
    *[(path, "zero3.yaml", [], "runs in one process") for path in PAPERS if path.stem.startswith("variational")],
]


@pytest.mark.parametrize(
    ("recipe_path", "config", "flags", "expected"),
    PAIRINGS,
    ids=[f"{p.parent.name}/{p.stem}+{c or 'documented'}{'+' + '_'.join(f) if f else ''}" for p, c, f, _ in PAIRINGS],
)
def test_recipe_and_launch_pairings(recipe_path, config, flags, expected):
    if config is None:
        config, flags = documented_launch(recipe_path)
        config = ROOT / config
    else:
        config = RECIPES / "accelerate" / config
    env = accelerate_env(config, *flags)
    recipe = load_recipe(recipe_path)
    if expected is None:
        check_launch(recipe, env)
    else:
        with pytest.raises(RecipeError, match=expected):
            check_launch(recipe, env)


def test_zero_configs_say_what_their_precision_needs():
    for path in (RECIPES / "accelerate").glob("*zero*.yaml"):
        assert "training.bf16: true" in path.read_text(), path.name


# --------------------------------------------------------------------------- 2. variational: one process


def test_variational_pipeline_refuses_several_processes_and_deepspeed():
    assert single_process_problem({}, {}) is None
    assert single_process_problem({}, {"WORLD_SIZE": "1"}) is None
    message = single_process_problem({}, {"WORLD_SIZE": "2"})
    assert "this launch starts 2" in message and "single_gpu.yaml" in message and "prior_path" in message
    assert "under DeepSpeed (the accelerate config" in single_process_problem({}, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert "(training.deepspeed)" in single_process_problem({"deepspeed": {"zero_optimization": {"stage": 2}}}, {})


def test_variational_recipe_under_torchrun_is_refused_by_the_recipe_check(clean_launch_env):
    clean_launch_env.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate launch set in every process
    with pytest.raises(RecipeError, match=r"trainer 'variational': the variational pipeline runs in one process"):
        check_recipe(load_recipe(RECIPES / "demo" / "variational.yaml"))


def test_variational_pipeline_run_refuses_before_writing(tmp_path, clean_launch_env):
    from reasoning.data.datasets import load_records
    from reasoning.models.tiny import build_tiny_model
    from reasoning.trainers.variational import VariationalConfig, VariationalReasoningPipeline

    build_tiny_model("1m", tmp_path / "base", seed=0)
    pipeline = VariationalReasoningPipeline(
        VariationalConfig(),
        str(tmp_path / "base"),
        load_records("synthetic:addition?digits=2&n=8&seed=1&split=train"),
        {"output_dir": str(tmp_path / "run"), "use_cpu": True},
        lambda *a: pytest.fail("no engine may be built"),
    )
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="runs in one process"):
        pipeline.run()
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 3. executor backend


def test_executor_backend_decisions():
    assert executor_backend(None, 1, 1, 1) is None  # vLLM's own choice: "uni"
    assert executor_backend("uni", 1, 1, 1) == "uni"
    assert executor_backend(None, 1, 1, 4) == "external_launcher"
    assert executor_backend(None, 2, 1, 4) == "external_launcher"
    assert executor_backend("external_launcher", 4, 1, 8) == "external_launcher"
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 in 1 training process.*'mp'.*pickles"):
        executor_backend(None, 2, 1, 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 in 4 .*'mp'"):
        executor_backend("mp", 2, 1, 4)
    with pytest.raises(ValueError, match=r"'ray' runs the vLLM worker in another process"):
        executor_backend("ray", 1, 1, 1)
    with pytest.raises(ValueError, match=r"must divide the number of training processes \(6\)"):
        executor_backend(None, 4, 1, 6)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        executor_backend(None, 1, 2, 2)


def test_the_weight_iterator_cannot_cross_a_process_boundary():
    """Why tensor parallelism needs external_launcher: the mp executor pickles collective_rpc's kwargs
    (vllm/v1/executor/multiproc_executor.py, `MessageQueue.enqueue`), and a generator does not pickle."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cannot pickle 'generator' object"):
        pickle.dumps({"weights_iterator": iter_full_weights(model)})


def test_colocated_engine_refuses_tensor_parallelism_in_one_process(tmp_path, clean_launch_env):
    from reasoning.models.tiny import build_tiny_model
    from reasoning.rollout.vllm_engine import VLLMEngine

    build_tiny_model("1m", tmp_path, seed=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 in 1 training process"):
        VLLMEngine(str(tmp_path), tensor_parallel_size=2)  # refused before vLLM is started


# --------------------------------------------------------------------------- 5. weight probe (layout logic)


def test_probe_positions_and_layouts():
    from reasoning.rollout.vllm_engine import _probe_index, _same_layout

    embedding = (151_936, 3584)  # a Qwen2.5-7B embedding: 545M elements
    index = _probe_index(embedding)
    assert len(index) == 1024 and index[0] == 0 and index[-1] == 151_936 * 3584 - 1  # exact at the end
    assert _probe_index((5,)).tolist() == [0, 1, 2, 3, 4]
    assert _same_layout((128,), (128,))
    assert _same_layout((152_064, 3584), embedding)  # vLLM pads the vocabulary rows
    assert not _same_layout((75_968, 3584), embedding)  # a tensor-parallel shard of it
    assert not _same_layout((0,), (128, 512))  # a CPU linear layer, repacked
    assert not _same_layout((384,), (128,))  # fused q/k/v bias


# --------------------------------------------------------------------------- 6. LOCAL_RANK


def test_local_index_among_hosts():
    hosts = ["node-a", "node-a", "node-b", "node-b"]
    assert [local_index_among_hosts(hosts, r) for r in range(4)] == [0, 1, 0, 1]


def test_local_process_index_prefers_the_launchers_variables():
    assert local_process_index({"LOCAL_RANK": "3"}) == 3
    assert local_process_index({"LOCAL_RANK": "-1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == 1
    assert local_process_index({"SLURM_LOCALID": "2"}) == 2


LOCAL_INDEX_RANK = """
import os, socket, sys
import torch
host = os.environ.pop("FAKE_HOST", None)
if host:
    socket.gethostname = lambda: host  # this rank's machine
torch.distributed.init_process_group("gloo")
from reasoning.rollout.vllm_engine import local_process_index
print("LOCAL", torch.distributed.get_rank(), local_process_index())
torch.distributed.destroy_process_group()
"""


def run_two_ranks(hosts: list[str | None]) -> dict[int, int]:
    """Two real processes in one gloo group, LOCAL_RANK unset; rank -> local_process_index()."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank, host in enumerate(hosts):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "SLURM_LOCALID")}
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if host:
            env["FAKE_HOST"] = host
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", LOCAL_INDEX_RANK], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
        )
    found = {}
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        _, rank, index = next(line for line in out.splitlines() if line.startswith("LOCAL ")).split()
        found[int(rank)] = int(index)
    return found


def test_local_rank_fallback_is_the_index_on_the_machine_not_the_global_rank():
    assert run_two_ranks(["node-a", "node-b"]) == {0: 0, 1: 0}  # two machines: both are local index 0
    assert run_two_ranks([None, None]) == {0: 0, 1: 1}  # one machine


# --------------------------------------------------------------------------- 7. benchmark device


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_grpo_step_benchmark_trains_on_the_gpu_when_there_is_one(monkeypatch):
    bench = load_benchmark("grpo_step")
    work = bench.Workload()
    assert bench.resolve_device(work, cuda_available=False) == "cpu"
    assert bench.resolve_device(work, cuda_available=True) == "cuda"
    assert bench.resolve_device(bench.Workload(device="cpu"), cuda_available=True) == "cpu"
    with pytest.raises(ValueError, match="no GPU is visible"):
        bench.resolve_device(bench.Workload(device="cuda"), cuda_available=False)
    assert bench.training_args(work, "out")["use_cpu"] is (not torch.cuda.is_available())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert bench.training_args(work, "out")["use_cpu"] is False
    assert bench.parse(["ours", "--device", "cpu"])[1].device == "cpu"


def test_grpo_step_benchmark_reports_gpu_memory(monkeypatch):
    bench = load_benchmark("grpo_step")
    assert bench.device_memory("cpu") == {"device": "cpu"}
    mib = 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (30_000 * mib, 80_000 * mib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 41_000 * mib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 45_000 * mib)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "H100")
    report = bench.device_memory("cuda")
    assert report["device"] == "cuda" and report["gpu_name"] == "H100"
    assert report["device_memory"] == {
        "peak_allocated_mb": 41_000,
        "peak_reserved_mb": 45_000,
        "in_use_mb": 50_000,
        "total_mb": 80_000,
    }
    suite = load_benchmark("suite")
    table = suite.Report()
    suite.gpu_memory_note(table, {"ours": [report], "trl": [{"device": "cpu"}]})
    assert table.lines[-1].endswith("ours 41000 / 45000 / 50000") and "H100" in table.lines[-1]
    table = suite.Report()
    suite.gpu_memory_note(table, {"ours": [{"device": "cpu"}]})
    assert table.lines == []  # nothing on the CPU

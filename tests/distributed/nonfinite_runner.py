"""Two ranks, a NaN loss on one of them: both skip the same optimizer step whole.

Run under `torchrun --nproc_per_node 2` (gloo, CPU):

    python tests/distributed/nonfinite_runner.py OUT BACKENDS

BACKENDS is a comma-separated list run in turn in the same processes: `ddp` (plain data parallelism)
and/or `zero2` (DeepSpeed ZeRO-2, fp32, torch AdamW built by transformers). SFT on a tiny model with
gradient accumulation 2 for 3 optimizer steps; the input embeddings give NaN in the first micro-batch
of step 1 on rank 1 only. Each rank writes `OUT/<backend>/rank<r>.pt`: the weights after every
optimizer step and the log history.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def run(out_dir: Path, backend: str) -> None:
    from accelerate.state import AcceleratorState
    from transformers import TrainerCallback

    from reasoning.data.datasets import load_records
    from reasoning.models.tiny import build_tiny_model
    from reasoning.testing import cpu_training_args
    from reasoning.trainers.sft import make_sft_trainer

    if backend != "ddp":  # a new DeepSpeed plugin: forget the previous accelerator state (not the group)
        AcceleratorState._reset_state()
    rank = int(os.environ.get("RANK", "0"))
    deepspeed = None
    if backend == "zero2":
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 2},
        }
    args = cpu_training_args(
        out_dir,
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        deepspeed=deepspeed,
    )
    model, tokenizer = build_tiny_model("1m", seed=0)
    records = load_records("synthetic:addition?digits=2&n=64&seed=0&split=train")
    trainer = make_sft_trainer(model, tokenizer, records, args)
    snapshots: list[dict[str, torch.Tensor]] = []

    class Inject(TrainerCallback):
        micro = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.micro = 0

        def on_substep_end(self, args, state, control, **kwargs):
            self.micro += 1

        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    inject = Inject()
    trainer.add_callback(inject)

    def nan_on_rank_1(module, inputs, output):
        if rank == 1 and module.training and inject.micro == 0 and trainer.state.global_step == 1:
            return output * math.nan
        return None

    model.get_input_embeddings().register_forward_hook(nan_on_rank_1)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"initial": initial, "steps": snapshots, "log_history": trainer.state.log_history},
        out_dir / f"rank{rank}.pt",
    )


def main(out: str, backends: str) -> None:
    for backend in backends.split(","):
        run(Path(out) / backend, backend)
    if torch.distributed.is_initialized():  # a clean exit (a rank otherwise aborts at teardown)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Every result is on disk and the process group is gone; DeepSpeed's CPU build can still abort a
    # rank during interpreter teardown ("terminate called without an active exception", a C++ thread
    # left joinable), which would turn a finished run into a failed one. Skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Run by `test_side_parameters.py` under `torchrun --nproc_per_node 2` (gloo, CPU): side parameters
average their gradients over the ranks, and a manual step leaves the ranks with equal weights.

Each rank gives the side module its own gradient (rank + 1 on every entry, or none on rank 1 for a
second parameter); after `reduce_gradients` both ranks hold the mean. Results go to `<out>/rank<r>.pt`.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from reasoning.trainers.roles import SideParameters


def main(out: Path) -> None:
    state = PartialState(cpu=True)
    rank = state.process_index
    torch.manual_seed(0)  # the same initial weights on both ranks
    module = torch.nn.Linear(3, 2)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=state.num_processes, reduce=reduce))
    side = SideParameters(trainer, "head", module, lr=0.1, step="manual")
    module.weight.grad = torch.full_like(module.weight, float(rank + 1))
    if rank == 0:  # rank 1 has no gradient for the bias: it counts as 0
        module.bias.grad = torch.full_like(module.bias, 4.0)
    side.reduce_gradients()
    reduced = {"weight": module.weight.grad.clone(), "bias": module.bias.grad.clone()}
    module.weight.grad = torch.full_like(module.weight, float(rank))  # a different gradient per rank
    side.step()
    torch.save(
        {"reduced": reduced, "weights": {k: v.clone() for k, v in module.state_dict().items()}},
        out / f"rank{rank}.pt",
    )
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Checkpoints a kill cannot corrupt, and resumes that repeat the uninterrupted run.

transformers.Trainer writes `checkpoint-N/` (weights, optimizer, scheduler, per-process RNG states
of python / numpy / torch, `trainer_state.json`) straight into the run directory, and restores the
data position on resume by skipping the batches already trained on. `ResumableTrainer`, mixed into
every trainer of this package, adds:

- a completion marker (`checkpoint_complete.json`), written last and atomically (temporary file +
  `os.replace`), after every process has written its files; `latest_checkpoint` ignores a
  directory without it, so a kill while saving leaves the previous checkpoint the one resumed.
  Old checkpoints are rotated (`save_total_limit`) only once the new one is marked, so a kill
  never leaves zero loadable checkpoints;
- the trainer's own state (`trainer_extra_state`: replay buffers, running estimates, the
  generation buffer of a rollout trainer, ...), one file per process, saved with `torch.save`
  and read back with `torch.load(weights_only=True)`: only tensors and plain containers (dict,
  list, tuple, str, int, float, bool, None) are allowed, checked when saving, so loading never
  unpickles arbitrary objects;
- no extra optimizer step when resuming a checkpoint that already reached `max_steps`
  (transformers runs one step of an epoch before it checks the step budget).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from reasoning.models.lora import ADAPTER_DIR, is_peft_model

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
EXTRA_STATE = "trainer_extra_state_rank{rank}.pt"

_SCALARS = (str, int, float, bool, type(None))


def is_complete_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a checkpoint whose save finished (its completion marker exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(run_dir: str | Path) -> str | None:
    """The complete `checkpoint-N` under `run_dir` with the largest N (None if there is none)."""
    found = []
    for path in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and is_complete_checkpoint(path):
            found.append((int(step), path))
    return str(max(found)[1]) if found else None


def check_plain(value: Any, where: str = "state") -> Any:
    """`value` with mappings made plain dicts; a ValueError naming the key for anything that
    `torch.load(weights_only=True)` would refuse (so the mistake shows at save time, not at resume)."""
    if isinstance(value, torch.Tensor) or isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                raise ValueError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}; use str or int")
            out[key] = check_plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [check_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(
        f"checkpoint {where} is a {type(value).__name__}; trainer_extra_state may hold only tensors, "
        "dicts, lists, tuples, str, int, float, bool and None (convert it, e.g. dataclasses.asdict, "
        "float(x), torch.as_tensor(array))"
    )


def save_state_file(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (tensors and plain containers only) atomically for `load_state_file`."""
    path = Path(path)
    plain = check_plain(state)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(plain, tmp)
    os.replace(tmp, path)


def load_state_file(path: str | Path) -> dict[str, Any]:
    """Read a `save_state_file` file without unpickling arbitrary objects (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    with tmp.open("w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)


def save_trained_policy(trainer: Any, directory: str | Path) -> None:
    """Save a `transformers.Trainer`'s model into `directory`; all ranks call this.

    A plain model is saved as usual (`trainer.save_model`). A PEFT (LoRA) model is saved twice: the
    adapter alone in `directory/adapter` (`trainer.save_model`, which handles DeepSpeed / FSDP state
    dicts; `models.lora.load_lora_policy` reads it back) and the merged model W + ΔW in `directory`
    itself (from `iter_full_weights`, which gathers ZeRO-3 shards module by module, so every rank
    takes part), which transformers and vLLM load directly.
    """
    from reasoning.rollout.vllm_engine import iter_full_weights  # the weight streamer of the vllm engine

    directory = Path(directory)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(str(directory))
        return
    trainer.save_model(str(directory / ADAPTER_DIR))
    keep = trainer.args.should_save
    # copies: ZeRO-3 gathered storage is released after each module
    merged = {name: tensor.detach().clone() for name, tensor in iter_full_weights(model) if keep}
    if keep:
        model.get_base_model().save_pretrained(str(directory), state_dict=merged)


def save_final_model(trainer: Any, path: str | Path, tokenizer: Any = None) -> None:
    """`trainer.save_model(path)` (and the tokenizer) made atomic: written to `<path>.partial`, then
    renamed, so `<path>/config.json` exists only for a whole model (runs test it to skip training)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    save_trained_policy(trainer, partial)
    trainer.accelerator.wait_for_everyone()
    if main:
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        if path.exists():  # an earlier save (a pipeline stage rerun after a kill) or a partial one
            shutil.rmtree(path)
        os.replace(partial, path)
    trainer.accelerator.wait_for_everyone()


class ResumableTrainer:
    """Mixin for transformers.Trainer subclasses (put it first): see the module docstring.

    Subclasses keep state a resume needs in `trainer_extra_state` / `load_trainer_extra_state`.
    """

    def trainer_extra_state(self) -> dict[str, Any]:
        """Hook: state beyond model/optimizer/scheduler/RNG that a resume needs (e.g. replay buffers).
        Tensors and plain containers only (see `check_plain`)."""
        return {}

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        """Hook: restore what `trainer_extra_state` returned."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything this process saves beside transformers' files (base classes add to it)."""
        return {"extra": self.trainer_extra_state()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_trainer_extra_state(state.get("extra", {}))

    # ------------------------------------------------------------------ save
    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # re-saving a step: incomplete until done
        # transformers rotates old checkpoints at the end of its save; rotate only after the marker,
        # or a kill in between could leave no complete checkpoint at all.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        folder.mkdir(parents=True, exist_ok=True)
        save_state_file(self.checkpoint_state(), folder / EXTRA_STATE.format(rank=self.args.process_index))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _write_marker(folder, {"global_step": self.state.global_step, "world_size": self.args.world_size})
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    # ------------------------------------------------------------------ resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """transformers' `train`; `resume_from_checkpoint=True` takes the latest *complete* checkpoint,
        and this trainer's own state is restored before the loop starts (for every backend: with
        DeepSpeed transformers does not call `_load_from_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.restore_checkpoint_state(Path(resume_from_checkpoint))
        if not getattr(self, "_logs_rewound", False):  # a later `train` call in this process continues
            self._logs_rewound = True
            state_file = Path(resume_from_checkpoint) / TRAINER_STATE_NAME if resume_from_checkpoint else None
            resumed = state_file is not None and state_file.is_file()
            self.rewind_logs(TrainerState.load_from_json(str(state_file)).global_step if resumed else 0)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def rewind_logs(self, step: int) -> None:
        """Hook: a run starting at optimizer step `step` (0: from scratch) redoes whatever an
        interrupted attempt in the same output directory did after it; drop that from the trainer's
        own logs so that each step appears once."""

    def restore_checkpoint_state(self, folder: str | Path) -> None:
        """Load this process's `checkpoint_state` file from checkpoint `folder` (`train` calls this)."""
        folder = Path(folder)
        own = folder / EXTRA_STATE.format(rank=self.args.process_index)
        if own.exists():
            self.load_checkpoint_state(load_state_file(own))
            return
        first = folder / EXTRA_STATE.format(rank=0)
        if first.exists():
            # Resumed with more processes than saved: replicated state (log Z heads, estimates) is
            # right; per-process state (generation and replay buffers) starts from rank 0's.
            logger.warning("%s has no state for process %d; using rank 0's", folder, self.args.process_index)
            state = load_state_file(first)
            state.pop("buffer", None)
            self.load_checkpoint_state(state)
        elif any(folder.glob("*.safetensors")) or (folder / TRAINER_STATE_NAME).exists():
            logger.warning("%s has no trainer extra state (not written by this package?)", folder)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # transformers runs the first optimizer step of an epoch before it compares global_step with
        # max_steps: resuming a checkpoint that already reached max_steps would train one step too many.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

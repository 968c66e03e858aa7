"""Rollouts with transformers `generate`: slow, works everywhere, the reference for correctness."""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.state import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from reasoning.rollout.base import Rollout, Sampling


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """The device an `hf` engine loads its model on.

    `requested` ("cpu", "cuda", "cuda:1", ...) is checked: a CUDA device that is not there is an error
    (a model silently left on the CPU is what this guards against). Without one: the device accelerate
    already chose for this process (a training run or `accelerate launch`: e.g. `cuda:LOCAL_RANK`, or
    the CPU with `ACCELERATE_USE_CPU`), else CUDA when available (device `LOCAL_RANK` when that is
    set), else the CPU. accelerate's state is read, not created: `PartialState()` would initialise a
    process group under a launcher.
    """
    if requested is not None and str(requested):
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device {str(requested)!r} is not a torch device; use cpu, cuda or cuda:N ({err})"
            ) from err
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"device {str(requested)!r} was asked for but no CUDA device is visible "
                    "(torch.cuda.is_available() is False); use device cpu, or check CUDA_VISIBLE_DEVICES"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {str(requested)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                    f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
                )
        return device
    if PartialState._shared_state:  # initialised by TrainingArguments / Accelerator / a launcher
        return PartialState().device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


class HFEngine:
    """Generation with `model.generate`, batched over prompts, left-padded.

    The engine either loads its own copy of the model from `model_path`, on `device` (default:
    `choose_device()`, the GPU when there is one), or wraps a live model (`model=`), which stays where
    its owner put it and whose `sync_weights` is a no-op. Inputs go to the model's device.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        if model is None and model_path is None:
            raise ValueError("HFEngine needs a model_path or a live model=")
        if model is None:
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            target = choose_device(device)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(target)
        elif device is not None:
            raise ValueError(
                "HFEngine(model=...) generates where the live model is: move the model, pass no device="
            )
        self.model = model
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path or model.name_or_path)
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights into the engine's model (no-op when it is the same object)."""
        target = getattr(model, "module", model)
        if target is self.model:
            return
        self.model.load_state_dict(target.state_dict())

    def close(self) -> None:
        self.model = None

    def generate(
        self, prompt_ids: list[list[int]], sampling: Sampling, n: int = 1, seeds: list[int] | None = None
    ) -> list[list[Rollout]]:
        """For each prompt, `n` completions with their sampling log-probs and finish reasons.

        With `seeds` (one per prompt) each prompt is generated on its own, after seeding torch with
        its seed: one shared generator over a batch would make a prompt's samples depend on its
        batch-mates (and padding), so per-prompt seeds cost the batching over prompts.
        """
        if seeds is not None:
            if len(seeds) != len(prompt_ids):
                raise ValueError(
                    f"{len(seeds)} seeds for {len(prompt_ids)} prompts: give one seed per prompt"
                )
            grouped: list[list[Rollout]] = []
            with torch.random.fork_rng(devices=[]):
                for index, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
                    torch.manual_seed(seed)
                    grouped.extend(self._generate_batch([ids], sampling, n, index))
            return grouped
        results: list[list[Rollout]] = []
        rng = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompt_ids), self.batch_size):
                batch = prompt_ids[start : start + self.batch_size]
                results.extend(self._generate_batch(batch, sampling, n, start))
        return results

    @torch.no_grad()
    def _generate_batch(
        self, batch: list[list[int]], sampling: Sampling, n: int, offset: int
    ) -> list[list[Rollout]]:
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        eos_ids = [] if sampling.ignore_eos else [self.tokenizer.eos_token_id, *sampling.stop_token_ids]
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=n,
            eos_token_id=eos_ids or None,
            min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else None,
            )
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()
        # scores are the processed (warped) logits the sampler drew from: their log-softmax at the
        # chosen token is the behaviour log-probability.
        scores = torch.stack(out.scores, dim=1).float().cpu() if out.scores else torch.empty(0)
        token_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        grouped: list[list[Rollout]] = []
        for row, ids in enumerate(batch):
            rollouts = []
            for j in range(n):
                k = row * n + j
                rollouts.append(
                    self._finish(ids, new_tokens[k].tolist(), token_logprobs[k].tolist(), sampling)
                )
                rollouts[-1].prompt_index = offset + row
            grouped.append(rollouts)
        return grouped

    def _finish(
        self, prompt: list[int], tokens: list[int], logprobs: list[float], sampling: Sampling
    ) -> Rollout:
        """Cut a generated row at its first stop (EOS/stop id kept, stop string's text dropped)."""
        stop_ids = set() if sampling.ignore_eos else {self.tokenizer.eos_token_id, *sampling.stop_token_ids}
        length, finish = len(tokens), "length"
        for t, token in enumerate(tokens):
            if token in stop_ids:
                length, finish = t + 1, "stop"
                break
        tokens, logprobs = tokens[:length], logprobs[:length]
        # as in vLLM, the stop token stays in the ids but not in the text
        shown = tokens[:-1] if finish == "stop" else tokens
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        if sampling.stop:
            cut = _first_stop(text, sampling.stop)
            if cut is not None:
                # keep tokens up to the one that completed the stop string
                for t in range(1, len(tokens) + 1):
                    if _first_stop(
                        self.tokenizer.decode(tokens[:t], skip_special_tokens=True), sampling.stop
                    ):
                        tokens, logprobs = tokens[:t], logprobs[:t]
                        break
                text, finish = text[:cut], "stop"
        return Rollout(
            prompt_ids=list(prompt), completion_ids=tokens, logprobs=logprobs, finish_reason=finish, text=text
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None

"""Latent thought models on the embedded addition task: inner steps, latent count, AR baseline, few-shot.

A tiny latent thought model (LTM) is trained by dual-rate variational Bayes
(`reasoning.trainers.latent_thought`) on 2-digit addition text (question, scratchpad, answer in the
plain template; `--examples-per-text` solved examples per sequence). Measured:

1. held-out NELBO per token (the ELBO perplexity bound) against training FLOPs, next to the exact
   held-out NLL per token of an autoregressive tiny Qwen2 of about the same parameter count trained on
   the same data stream with the same optimiser, run until it has used the LTM's FLOPs;
2. NELBO vs the number of fast-loop (inference) steps, 4 / 8 / 16 / 32, on the trained LTM, and vs
   the training-time T_fast (short runs, equal steps);
3. NELBO vs the number of latent vectors per layer (short runs, equal steps);
4. few-shot (0 and `--shots`) greedy addition accuracy: z fitted to the prompt from several
   initialisations (avg@K, pass@K over z, lowest-NELBO choice), z = 0, and the AR baseline.

Perplexity is written in two conventions: `perplexity_upper_bound` (`perplexity` for the AR model)
= exp(Σ NELBO / Σ N) over the held-out texts, and `perplexity_sequence_mean` = the mean over texts of
exp(NELBO(x) / N_x), the convention of the latent thought models' reference code.

FLOPs. A decoder pass over N tokens costs 2·P·N forward and 4·P·N backward, so one training pass
is 6·P·N. P counts every parameter applied per token (the tied embedding once: the LM head matmul;
the input lookup is free); the LTM's cross-attention K/V projections act on its n latents per layer
instead of on tokens, so they count 6·P_kv·n per sequence. An LTM training step runs the fast loop
(T_fast forward + backward passes with respect to z) and the slow step, and every pass is counted as
a full 6·P·N: (T_fast + 1)·6·P·N per step. The inner backward computes no weight gradients, so its
true cost is nearer 4·P·N; the count favours the AR model. Attention scores (4·d·context per token
and layer: about 10 % at 116-token sequences, for both models alike) and the optimisers' updates are
not counted. Evaluation is not counted.

    python benchmarks/latent_thought_study.py --run-dir runs/latent_thought_study   # ~8 min, 1 thread
    python benchmarks/latent_thought_study.py --quick --run-dir /tmp/ltm-quick       # a smoke run

Writes `<run-dir>/results.json` and PNG plots (matplotlib) there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/latent_thought_study")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from results.json")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--latents", type=int, default=4, help="latent vectors per layer of the main LTM")
    parser.add_argument("--fast-steps", type=int, default=8, help="training T_fast of the main LTM")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of the main LTM")
    parser.add_argument("--sweep-steps", type=int, default=80, help="optimiser steps of each sweep run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimiser step")
    parser.add_argument("--examples-per-text", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=15, help="the same for every run")
    parser.add_argument("--eval-inference-steps", type=int, default=32, help="fast-loop steps of the bound")
    parser.add_argument("--fewshot-inference-steps", type=int, default=16, help="fast-loop steps on prompts")
    parser.add_argument("--heldout-records", type=int, default=128)
    parser.add_argument("--questions", type=int, default=64, help="few-shot questions")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--num-inits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.sweep_steps, args.heldout_records, args.questions = 6, 3, 16, 4
        args.warmup_steps = 1
    return args


# ------------------------------------------------------------------------------------ models


def build_ltm(args, latents: int):
    from reasoning.models.latent_thought import build_latent_thought_checkpoint

    model, tokenizer = build_latent_thought_checkpoint(
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.hidden_size // 32,
        intermediate_size=4 * args.hidden_size,
        latents_per_layer=latents,
        max_position_embeddings=512,
    )
    return model, tokenizer


def build_ar(args, target_params: int):
    """A Qwen2 with the tiny models' conventions (reasoning.models.tiny: char tokenizer, tied embeddings,
    head_dim 32), the LTM's width and depth, and the MLP widened until the parameter counts match."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from reasoning.models.tiny import build_char_tokenizer, count_parameters

    tokenizer = build_char_tokenizer(model_max_length=512)
    d, layers = args.hidden_size, args.num_layers

    def config(intermediate: int) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=d,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=d // 32,
            num_key_value_heads=d // 32,
            head_dim=32,
            max_position_embeddings=512,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            use_sliding_window=False,
        )

    # parameters grow by 3·d·layers per unit of intermediate size
    base = count_parameters(Qwen2ForCausalLM(config(4 * d)))
    intermediate = 4 * d + round((target_params - base) / (3 * d * layers))
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config(intermediate))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model, tokenizer


def flop_counts(model, latents: int) -> dict[str, int]:
    """P applied per token, and P_kv applied per latent vector (cross-attention K/V projections)."""
    total = sum(p.numel() for p in model.parameters())
    kv = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "cross_attn.k_proj" in name or "cross_attn.v_proj" in name
    )
    return {"params": total, "per_token": total - kv, "per_latent": kv, "latents": latents}


def training_flops(counts: dict[str, int], tokens: int, sequences: int, passes: int) -> float:
    """passes · 6 · (P_token · tokens + P_kv · n · sequences)."""
    return (
        passes * 6.0 * (counts["per_token"] * tokens + counts["per_latent"] * counts["latents"] * sequences)
    )


# ------------------------------------------------------------------------------------ training


def training_args(args, output_dir: Path, max_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",  # constant: intermediate checkpoints are fair points
        warmup_steps=args.warmup_steps,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=args.seed,
        include_num_input_tokens_seen="non_padding",
    )


def make_probe(evaluate, flops_of, at_steps=(), at_flops=(), stop_flops=None, snapshot_step=None):
    """A callback that evaluates at given steps or FLOP thresholds, records FLOPs, and can stop the run."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self.pending = sorted(at_flops)
            self.snapshot = None
            self.start = time.monotonic()
            self.eval_seconds = 0.0

        def on_step_end(self, train_args, state, control, model=None, **kwargs):
            sequences = state.global_step * train_args.per_device_train_batch_size
            flops = flops_of(state.num_input_tokens_seen, sequences)
            due = state.global_step in at_steps
            while self.pending and flops >= self.pending[0]:
                self.pending.pop(0)
                due = True
            if stop_flops is not None and flops >= stop_flops:
                control.should_training_stop = True
                due = True
            if snapshot_step is not None and state.global_step == snapshot_step:
                self.snapshot = copy.deepcopy(model).eval()
            if due:
                begin = time.monotonic()
                metrics = evaluate(model)
                self.eval_seconds += time.monotonic() - begin
                self.history.append(
                    {
                        "step": state.global_step,
                        "tokens": int(state.num_input_tokens_seen),
                        "flops": flops,
                        "train_seconds": time.monotonic() - self.start - self.eval_seconds,
                        **metrics,
                    }
                )
                print(f"  step {state.global_step}: {metrics}", flush=True)
            return control

    return Probe()


def train_ltm(
    args, name, latents, fast_steps, max_steps, records, heldout_rows, at_steps, run_dir, init_logvar=-5.0
):
    import torch

    from reasoning.models.latent_inference import elbo_perplexity
    from reasoning.trainers.latent_thought import DualRateConfig, make_latent_thought_trainer

    model, tokenizer = build_ltm(args, latents)
    counts = flop_counts(model, latents)
    config = DualRateConfig(
        fast_steps=fast_steps, examples_per_text=args.examples_per_text, init_logvar=init_logvar
    )
    eval_config = DualRateConfig(inference_steps=args.eval_inference_steps)

    def evaluate(m):
        bound = elbo_perplexity(
            m, heldout_rows, config=eval_config, batch_size=16, generator=torch.Generator().manual_seed(1)
        )
        return {
            "nelbo_per_token": bound.nelbo_per_token,
            "nll_per_token": bound.nll_per_token,
            "perplexity_upper_bound": bound.perplexity_upper_bound,
            "perplexity_sequence_mean": bound.perplexity_sequence_mean,
        }

    probe = make_probe(
        evaluate, lambda tokens, seqs: training_flops(counts, tokens, seqs, fast_steps + 1), at_steps=at_steps
    )
    trainer = make_latent_thought_trainer(
        model, tokenizer, records, training_args(args, run_dir / name, max_steps), config, callbacks=[probe]
    )
    print(
        f"{name}: LTM n={latents} T_fast={fast_steps} init log σ² {init_logvar}, {counts['params']} parameters"
    )
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    logs = [e for e in trainer.state.log_history if "latent/nelbo_end" in e]
    return (
        model,
        tokenizer,
        {
            "name": name,
            "latents_per_layer": latents,
            "fast_steps": fast_steps,
            "init_logvar": init_logvar,
            **counts,
            "steps": trainer.state.global_step,
            "wall_seconds": seconds,
            "eval_seconds": probe.eval_seconds,
            "history": probe.history,
            "train_log": [
                {
                    k: e[k]
                    for k in ("step", "latent/nelbo_start", "latent/nelbo_end", "latent/kl", "latent/sigma")
                }
                for e in logs
            ],
        },
    )


def train_ar(args, records, heldout_texts, budget_flops, equal_token_step, target_params, run_dir):
    from transformers import Trainer

    from reasoning.eval.latent_thought import token_perplexity
    from reasoning.models.latent_inference import document_texts, tokenize_texts
    from reasoning.trainers.latent_thought import LatentThoughtCollator

    model, tokenizer = build_ar(args, target_params)
    counts = flop_counts(model, 0)
    dataset = tokenize_texts(document_texts(records, args.examples_per_text), tokenizer, 512)

    def evaluate(m):
        m.eval()
        out = token_perplexity(m, tokenizer, heldout_texts)
        m.train()
        return {
            "nll_per_token": out["nll_per_token"],
            "perplexity": out["perplexity"],
            "perplexity_sequence_mean": out["perplexity_sequence_mean"],
        }

    flops_of = lambda tokens, seqs: training_flops(counts, tokens, seqs, 1)  # noqa: E731
    probe = make_probe(
        evaluate,
        flops_of,
        at_steps={equal_token_step},
        at_flops=[budget_flops * f for f in (0.125, 0.25, 0.5, 0.75)],
        stop_flops=budget_flops,
        snapshot_step=equal_token_step,
    )
    tokens_per_step = sum(len(r) for r in dataset["input_ids"]) / len(dataset) * args.batch_size
    max_steps = math.ceil(1.2 * budget_flops / flops_of(tokens_per_step, args.batch_size)) + 10
    trainer = Trainer(
        model=model,
        args=training_args(args, run_dir / "ar", max_steps),
        train_dataset=dataset,
        data_collator=LatentThoughtCollator(pad_id=tokenizer.pad_token_id),
        callbacks=[probe],
    )
    print(f"ar: Qwen2 {counts['params']} parameters, budget {budget_flops:.3g} FLOPs", flush=True)
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    return (
        model.eval(),
        probe.snapshot,
        tokenizer,
        {
            "name": "ar",
            **counts,
            "intermediate_size": model.config.intermediate_size,
            "steps": trainer.state.global_step,
            "wall_seconds": seconds,
            "eval_seconds": probe.eval_seconds,
            "history": probe.history,
        },
    )


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    if args.replot:
        path = Path(args.run_dir) / "results.json"
        results = json.loads(path.read_text())
        plot(results, Path(args.run_dir))
        path.write_text(json.dumps(results, indent=2))
        return
    import torch

    torch.set_num_threads(args.threads)
    from reasoning.data.synthetic import records_from_spec
    from reasoning.eval.latent_thought import few_shot_accuracy
    from reasoning.models.latent_inference import (
        document_texts,
        elbo_perplexity,
        fit_posterior,
        tokenize_texts,
    )
    from reasoning.models.tiny import build_char_tokenizer
    from reasoning.trainers.latent_thought import DualRateConfig, LatentThoughtCollator

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    study_start = time.monotonic()
    digits = args.digits
    train_records = records_from_spec(f"addition?digits={digits}&n=40000&seed=0&split=train")
    heldout = records_from_spec(f"addition?digits={digits}&n={args.heldout_records}&seed=12345&split=test")
    questions = records_from_spec(f"addition?digits={digits}&n={args.questions}&seed=777&split=test")
    heldout_texts = document_texts(heldout, args.examples_per_text)
    results: dict[str, Any] = {
        "settings": vars(args),
        "flop_accounting": __doc__.split("FLOPs.")[1].split("\n\n")[0],
        "perplexity_conventions": {
            "perplexity_upper_bound": "exp(sum of NELBO / sum of scored tokens) over the held-out texts",
            "perplexity": "exp(sum of NLL / sum of scored tokens), exact (AR model)",
            "perplexity_sequence_mean": "mean over texts of exp(NELBO(x) / N_x) (NLL for the AR model): "
            "the latent thought reference code's convention",
        },
    }

    def save() -> None:
        results["study_seconds"] = time.monotonic() - study_start
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))

    # 1. the main LTM, evaluated along training
    at = {max(1, round(args.steps * f)) for f in (0.2, 0.4, 0.6, 0.8, 1.0)} | {args.sweep_steps}
    heldout_rows = tokenize_texts(heldout_texts, build_char_tokenizer(), 512)["input_ids"]
    ltm, tokenizer, main = train_ltm(
        args, "ltm", args.latents, args.fast_steps, args.steps, train_records, heldout_rows, at, run_dir
    )
    results["ltm"] = main
    save()

    # 2. inference steps on the trained model, and the NELBO along one 32-step fast loop
    ltm.eval()
    sweep = []
    for steps in (4, 8, 16, 32):
        begin = time.monotonic()
        bound = elbo_perplexity(
            ltm,
            heldout_rows,
            config=DualRateConfig(),
            steps=steps,
            generator=torch.Generator().manual_seed(1),
        )
        sweep.append(
            {
                "inference_steps": steps,
                "nelbo_per_token": bound.nelbo_per_token,
                "nll_per_token": bound.nll_per_token,
                "kl_per_token": bound.kl_per_token,
                "perplexity_upper_bound": bound.perplexity_upper_bound,
                "perplexity_sequence_mean": bound.perplexity_sequence_mean,
                "seconds": time.monotonic() - begin,
            }
        )
        print(f"inference steps {steps}: {sweep[-1]}", flush=True)
    batch = LatentThoughtCollator()([{"input_ids": r} for r in heldout_rows])
    fit = fit_posterior(
        ltm, batch["input_ids"], batch["attention_mask"], 32, generator=torch.Generator().manual_seed(1)
    )
    tokens = int(batch["attention_mask"][:, 1:].sum())
    results["inference_steps"] = {
        "sweep": sweep,
        "loop_trace_32": (fit.nelbo_trace.sum(dim=1) / tokens).tolist(),
    }
    save()

    # 3. few-shot accuracy of the main LTM (z fitted / z = 0)
    demos = train_records[:2000]
    few = {}
    for shots in sorted({0, args.shots}):
        common = {"max_new_tokens": 8 * digits + 16, "batch_size": 16, "seed": args.seed}
        config = DualRateConfig(num_inits=args.num_inits, inference_steps=args.fewshot_inference_steps)
        few[f"ltm_fit_{shots}shot"] = few_shot_accuracy(
            ltm, tokenizer, questions, demos, shots, config=config, **common
        )
        if shots:  # every initialisation at μ₀ = 0 (as in training): the K decodes differ only through ε
            mu0 = DualRateConfig(
                num_inits=args.num_inits,
                inference_steps=args.fewshot_inference_steps,
                inference_init_scale=0.0,
            )
            few[f"ltm_fit_mu0_{shots}shot"] = few_shot_accuracy(
                ltm, tokenizer, questions, demos, shots, config=mu0, **common
            )
        few[f"ltm_prior_{shots}shot"] = few_shot_accuracy(
            ltm, tokenizer, questions, demos, shots, infer=False, config=config, **common
        )
        print(shots, {k: {m: v for m, v in few[k].items() if m != "samples"} for k in few}, flush=True)
    results["few_shot"] = few
    save()

    # 4. the autoregressive baseline at equal FLOPs (and at equal tokens)
    budget = main["history"][-1]["flops"]
    ar, ar_equal_tokens, ar_tokenizer, ar_result = train_ar(
        args, train_records, heldout_texts, budget, args.steps, main["params"], run_dir
    )
    results["ar"] = ar_result
    for shots in sorted({0, args.shots}):
        common = {"max_new_tokens": 8 * digits + 16, "batch_size": 16, "seed": args.seed}
        few[f"ar_equal_flops_{shots}shot"] = few_shot_accuracy(
            ar, ar_tokenizer, questions, demos, shots, **common
        )
        if ar_equal_tokens is not None:
            few[f"ar_equal_tokens_{shots}shot"] = few_shot_accuracy(
                ar_equal_tokens, ar_tokenizer, questions, demos, shots, **common
            )
    save()

    # 5. short runs: latent vectors per layer, training-time T_fast (equal steps)
    sweeps = []
    plan = [(1, args.fast_steps, -5.0), (16, args.fast_steps, -5.0), (args.latents, 4, -5.0)]
    plan += [(args.latents, 16, -5.0), (args.latents, args.fast_steps, 0.0)]
    for latents, fast_steps, init_logvar in plan:
        _, _, run = train_ltm(
            args,
            f"ltm_n{latents}_T{fast_steps}_logvar{init_logvar:g}",
            latents,
            fast_steps,
            args.sweep_steps,
            train_records,
            heldout_rows,
            {args.sweep_steps},
            run_dir,
            init_logvar=init_logvar,
        )
        sweeps.append(run)
        results["sweeps"] = sweeps
        save()
    plot(results, run_dir)
    save()
    print(f"done in {time.monotonic() - study_start:.0f} s: {run_dir / 'results.json'}")


# ------------------------------------------------------------------------------------ plots


def plot(results: dict[str, Any], run_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["plots"] = "matplotlib is not installed: no plots written"
        print(results["plots"])
        return
    files = []
    main, ar = results["ltm"], results["ar"]

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(
        [h["flops"] for h in main["history"]],
        [h["nelbo_per_token"] for h in main["history"]],
        "o-",
        label=f"LTM (T_fast={main['fast_steps']}, n={main['latents_per_layer']}): NELBO bound",
    )
    ax.plot(
        [h["flops"] for h in ar["history"]],
        [h["nll_per_token"] for h in ar["history"]],
        "s-",
        label="AR Qwen2: NLL",
    )
    equal_tokens = next((h for h in ar["history"] if h["step"] == results["settings"]["steps"]), None)
    if equal_tokens is not None:
        ax.annotate(
            "AR at equal tokens",
            (equal_tokens["flops"], equal_tokens["nll_per_token"]),
            xytext=(0, -18),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6·P·tokens per decoder pass)")
    ax.set_ylabel("held-out nats / token")
    ax.set_title(f"equal FLOPs ({main['params'] / 1e3:.0f}k vs {ar['params'] / 1e3:.0f}k params)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "nelbo_vs_flops.png", dpi=120)
    files.append("nelbo_vs_flops.png")
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    sweep = results["inference_steps"]["sweep"]
    left.plot(
        [s["inference_steps"] for s in sweep], [s["nelbo_per_token"] for s in sweep], "o-", label="NELBO"
    )
    left.plot(
        [s["inference_steps"] for s in sweep], [s["nll_per_token"] for s in sweep], "^--", label="NLL part"
    )
    left.set_xscale("log", base=2)
    left.set_xlabel("inference (fast-loop) steps")
    left.set_ylabel("held-out nats / token")
    left.set_title("trained LTM: separate fits")
    left.legend(fontsize=8)
    trace = results["inference_steps"]["loop_trace_32"]
    right.plot(range(len(trace)), trace)
    right.set_xlabel("fast-loop step (32-step cosine schedule)")
    right.set_ylabel("NELBO / token")
    right.set_title("inside one fast loop")
    fig.tight_layout()
    fig.savefig(run_dir / "nelbo_vs_inference_steps.png", dpi=120)
    files.append("nelbo_vs_inference_steps.png")
    plt.close(fig)

    steps = results["settings"]["sweep_steps"]
    at_sweep = next((h for h in main["history"] if h["step"] == steps), None)
    points = [
        (r["latents_per_layer"], r["fast_steps"], r["init_logvar"], r["history"][-1]["nelbo_per_token"])
        for r in results["sweeps"]
    ]
    if at_sweep is not None:
        points.append(
            (main["latents_per_layer"], main["fast_steps"], main["init_logvar"], at_sweep["nelbo_per_token"])
        )
    n0, t0, v0 = main["latents_per_layer"], main["fast_steps"], main["init_logvar"]
    by_n = sorted((n, v) for n, t, lv, v in points if t == t0 and lv == v0)
    by_t = sorted((t, v) for n, t, lv, v in points if n == n0 and lv == v0)
    by_logvar = sorted((lv, v) for n, t, lv, v in points if n == n0 and t == t0)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(12, 3.6))
    left.plot([n for n, _ in by_n], [v for _, v in by_n], "o-")
    left.set_xscale("log", base=2)
    left.set_xlabel("latent vectors per layer (n)")
    left.set_ylabel(f"held-out NELBO / token after {steps} steps")
    middle.plot([t for t, _ in by_t], [v for _, v in by_t], "o-")
    middle.set_xscale("log", base=2)
    middle.set_xlabel("training T_fast")
    right.bar([f"{lv:g}" for lv, _ in by_logvar], [v for _, v in by_logvar])
    right.set_xlabel("initial log σ² of the fast loop")
    for axis in (left, middle, right):
        axis.set_title(
            f"{steps} steps; bound: {results['settings']['eval_inference_steps']} inference steps", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(run_dir / "nelbo_vs_latents_and_fast_steps.png", dpi=120)
    files.append("nelbo_vs_latents_and_fast_steps.png")
    plt.close(fig)

    few = results["few_shot"]
    labels, values = [], []
    for name, res in few.items():
        k = res["num_inits"]
        labels.append(f"{name} avg@{k}")
        values.append(res[f"avg@{k}"])
        if res["latent_inference"]:
            labels.append(f"{name} pass@{k}")
            values.append(res[f"pass@{k}"])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.2))
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    for i, value in enumerate(values):
        ax.text(value + 0.01, i, f"{100 * value:.1f}%", va="center", fontsize=7)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("greedy accuracy")
    ax.set_title(
        f"{results['settings']['digits']}-digit addition, {few[name]['questions']} held-out questions"
    )
    fig.tight_layout()
    fig.savefig(run_dir / "few_shot_accuracy.png", dpi=120)
    files.append("few_shot_accuracy.png")
    plt.close(fig)
    results["plots"] = files


if __name__ == "__main__":
    main()

"""Run directories -> one self-contained HTML page: training curves, evaluation tables, completions.

`reasoning report RUN_DIR [RUN_DIR ...]` reads what `reasoning train` / `reasoning demo` write:

- `metrics.jsonl` (one line per logging step: step, epoch, time and the logged metrics; with
  `eval.steps`, one more line per evaluation during training: `eval/<benchmark>/<metric>` and
  `time/eval`); the variational pipeline writes one per SFT stage (`prior/`, `posterior/`,
  `final_sft/`), each drawn as its own series;
- `completions.jsonl` (sampled completions with their rewards) and `eval/*/results.json` with
  `samples.jsonl` (graded evaluation completions);
- figures a run drew itself (`*.png`, e.g. the variational pipeline's IWAE-bound curves).

Metric names differ per trainer, so plots are found by name: one panel per benchmark evaluated
during training (`eval/<benchmark>/avg@n`, `pass@k`, `maj@n` against the step) first, then known
groups (reward, accuracy, response length, KL / divergences, log Ẑ, entropy, clip fraction, loss,
...), then one panel per remaining name prefix (`gfn/`, `bayes/`, `diversity/`, ...). Several run
directories are overlaid in every panel (one colour per run). Plots are matplotlib PNGs embedded
as data URIs and the page's only script filters the completions table, so the file can be
mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Panel title -> regular expression over metric names; a metric goes to the first panel it matches.
PANELS: tuple[tuple[str, str], ...] = (
    ("Failures and skipped steps", r"failures|nonfinite|skipped"),
    ("Accuracy", r"accuracy|^rewards/correctness/mean$|(^|/)constraint$"),
    ("Reward", r"(^|/)rewards?(/|_std$|$)|log_reward"),
    ("Response length (tokens)", r"(^|/|_)length$"),
    ("KL / divergences", r"(^|[/_])(kl|tv|js|divergence)([/_]|$)"),
    ("log Ẑ (estimated log partition function)", r"(^|/)log_z"),
    ("Entropy", r"entropy"),
    ("Clip fraction", r"clip"),
    ("Loss", r"^loss($|/)|(^|/)nll$|nelbo"),
    ("Gradient norm", r"^grad_norm$"),
    ("Learning rate", r"^learning_rate$"),
)
# Bookkeeping columns of metrics.jsonl, never plotted as metrics.
NOT_METRICS = {"step", "epoch", "time", "total_flos"}
MAX_LINES_PER_PANEL = 8
MAX_BARS = 60  # timing chart: bars up to this many logged steps, stacked areas beyond
MAX_FIGURES = 24
METRIC_ORDER = ("avg@", "pass@", "maj@")


class ReportError(ValueError):
    """A run directory the report cannot use; the message names it and says what was expected."""


@dataclass
class Series:
    """One `metrics.jsonl`: per-step records and the end-of-training summary record."""

    label: str
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for record in self.records:
            for key, value in record.items():
                if key not in NOT_METRICS and _is_number(value):
                    names[key] = None
        return list(names)

    def values(self, name: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, skipping records without a finite value."""
        steps, values = [], []
        for record in self.records:
            value = record.get(name)
            if _is_number(value) and math.isfinite(value):
                steps.append(record.get("step", len(steps)))
                values.append(float(value))
        return steps, values


@dataclass
class Evaluation:
    """One `results.json` written by `reasoning.eval.evaluate`."""

    label: str
    results: dict[str, Any]
    samples: Path | None


@dataclass
class Run:
    """Everything the report shows about one run directory."""

    name: str
    path: Path
    trainer: str | None
    recipe: str | None
    series: list[Series]
    evaluations: list[Evaluation]
    completion_files: list[tuple[str, Path]]
    figures: list[Path]


# ------------------------------------------------------------------------------------------ reading


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank lines and a half-written last line (a live run) skipped."""
    records = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _skip(path: Path, root: Path) -> bool:
    """Checkpoints, TensorBoard and W&B folders hold copies or other formats, and `plots/` holds this
    module's own PNGs of an earlier report: not read."""
    parts = path.relative_to(root).parts[:-1]
    return any(p.startswith("checkpoint-") or p in ("wandb", "runs", "init", "plots") for p in parts)


def _found(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if not _skip(p, root))


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory (see the module docstring for what is looked for)."""
    root = Path(path)
    if not root.is_dir():
        raise ReportError(
            f"run directory {str(root)!r} does not exist (give a directory written by "
            "`reasoning train` or `reasoning demo`)"
        )
    name = name or root.name

    def label(directory: Path) -> str:
        relative = directory.relative_to(root)
        return name if relative == Path(".") else f"{name}/{relative.as_posix()}"

    series = []
    for metrics in _found(root, "metrics.jsonl"):
        records = read_jsonl(metrics)
        steps = [r for r in records if "train_runtime" not in r]
        summary = next((r for r in reversed(records) if "train_runtime" in r), {})
        if steps or summary:
            series.append(Series(label(metrics.parent), steps, summary))
    evaluations = []
    for results_path in _found(root, "results.json"):
        try:
            results = json.loads(results_path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(results, dict) and isinstance(results.get("benchmarks"), dict):
            samples = results_path.parent / "samples.jsonl"
            evaluations.append(
                Evaluation(label(results_path.parent), results, samples if samples.exists() else None)
            )
    completions = [(label(p.parent), p) for p in _found(root, "completions.jsonl")]
    figures = [p for p in _found(root, "*.png")][:MAX_FIGURES]
    if not (series or evaluations or completions):
        raise ReportError(
            f"{str(root)!r} has no metrics.jsonl, completions.jsonl or eval/*/results.json: is it a run "
            "directory written by `reasoning train` / `reasoning demo` (its training.output_dir)?"
        )
    recipe_path = root / "recipe.yaml"
    recipe = recipe_path.read_text() if recipe_path.exists() else None
    trainer = None
    if recipe:
        try:
            trainer = (yaml.safe_load(recipe) or {}).get("trainer")
        except yaml.YAMLError:
            trainer = None
    return Run(name, root, trainer, recipe, series, evaluations, completions, figures)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Several run directories; ones with the same folder name are told apart by their parent."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    return [load_run(p, label) for p, label in zip(paths, labels)]


# ------------------------------------------------------------------------------------------ grouping


def group_metrics(names: list[str]) -> list[tuple[str, list[str]]]:
    """Panels (title, metric names) for a set of metric names, in the order a reader wants them.

    Evaluations during training (`eval/<benchmark>/avg@n`, `pass@k`, `maj@n`) come first, one panel
    per benchmark.
    Timing metrics (`time/...`) are left out: they get their own stacked chart. Names no known
    group takes are grouped by their first path component (`gfn/log_reward` -> "gfn"), the rest
    under "other".
    """
    evaluations: dict[str, list[str]] = defaultdict(list)
    panels: dict[str, list[str]] = {title: [] for title, _ in PANELS}
    rest: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name.startswith("time/") or name in NOT_METRICS or name.startswith("train_"):
            continue
        if re.match(r"eval/[^/]+/(avg|pass|maj)@", name):  # (eval/<benchmark>/mean_length: a length)
            evaluations[f"Evaluation during training ({name.split('/')[1]})"].append(name)
            continue
        for title, pattern in PANELS:
            if re.search(pattern, name):
                panels[title].append(name)
                break
        else:
            rest[name.split("/", 1)[0] if "/" in name else "other"].append(name)
    ordered = [(title, members) for title, members in panels.items() if members]
    return [
        *evaluations.items(),
        *ordered,
        *sorted(rest.items(), key=lambda item: (item[0] == "other", item[0])),
    ]


Line = tuple[int, str]  # (index of the series, metric name)


def panel_lines(series: list[Series]) -> list[tuple[str, list[Line]]]:
    """The training-curve panels: (title, lines) with at most MAX_LINES_PER_PANEL lines each; a group
    with more is split ("Reward (1/2)", ...), keeping the lines of one metric together."""
    logged = [s.metric_names() for s in series]
    names = list(dict.fromkeys(n for names in logged for n in names))
    owners = {n: [i for i, names in enumerate(logged) if n in names] for n in names}
    panels = []
    for title, members in group_metrics(names):
        chunks: list[list[Line]] = [[]]
        for name in members:
            lines = [(i, name) for i in owners[name]]
            if chunks[-1] and len(chunks[-1]) + len(lines) > MAX_LINES_PER_PANEL:
                chunks.append([])
            chunks[-1].extend(lines)
        for k, chunk in enumerate(chunks):
            panels.append((title if len(chunks) == 1 else f"{title} ({k + 1}/{len(chunks)})", chunk))
    return panels


# ------------------------------------------------------------------------------------------ plotting


def _figure(width: float = 5.6, height: float = 3.2):
    # Figure objects without pyplot: no global state, no GUI backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and k are whole numbers
    return figure, ax


def _finish(figure, ax, title: str) -> str:
    """Title, grid and a legend under the axes (the figure grows to fit it); the PNG data URI."""
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    if entries:
        columns = 1 if entries < 3 else 2
        figure.set_figheight(figure.get_figheight() + 0.18 * math.ceil(entries / columns))
        figure.legend(loc="outside lower center", ncols=columns, fontsize=7, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


LINESTYLES = ("-", "--", ":", "-.")


def plot_panel(title: str, lines: list[Line], series: list[Series]) -> str | None:
    """One panel of training curves against the step.

    A report of one series colours each metric; a report of several (overlaid runs, pipeline
    stages) gives each series one colour on every panel and each metric a line style.
    """
    figure, ax = _figure()
    names = list(dict.fromkeys(name for _, name in lines))
    drawn = False
    for index, name in lines:
        steps, values = series[index].values(name)
        if not steps:
            continue
        if len(series) == 1:
            colour, style, label = f"C{names.index(name) % 10}", "-", name
        else:
            colour, style = f"C{index % 10}", LINESTYLES[names.index(name) % len(LINESTYLES)]
            label = f"{series[index].label}: {name}"
        ax.plot(
            steps,
            values,
            style,
            color=colour,
            label=label,
            marker="o" if len(steps) <= 30 else None,
            markersize=3,
        )
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    return _finish(figure, ax, title)


def records_by_step(records: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Step -> the union of the records logged at it (an evaluation during training logs its own
    record, with time/eval, at the step of a training log)."""
    by_step: dict[Any, dict[str, Any]] = {}
    for i, record in enumerate(records):
        by_step.setdefault(record.get("step", i), {}).update(record)
    return by_step


def plot_timing(s: Series) -> str | None:
    """Stacked bars of the `time/...` metrics (mean seconds per call over each logging window)
    and a line of wall seconds per optimizer step, Δtime / Δstep between logged records."""
    names = [n for n in s.metric_names() if n.startswith("time/")]
    timed = [
        (r["step"], r["time"]) for r in s.records if _is_number(r.get("time")) and _is_number(r.get("step"))
    ]
    # the clock starts before the model loads: measure from the first logged step when there are two
    previous = timed[0] if len(timed) > 1 else (0, 0.0)
    step_time: list[tuple[float, float]] = []
    for step, seconds in timed:
        if step > previous[0]:
            step_time.append((step, (seconds - previous[1]) / (step - previous[0])))
            previous = (step, seconds)
    if not names and not step_time:
        return None
    figure, ax = _figure()
    by_step = records_by_step(s.records)  # one bar per step
    steps = list(by_step)
    heights = [
        [
            float(r[name]) if _is_number(r.get(name)) and math.isfinite(r[name]) else 0.0
            for r in by_step.values()
        ]
        for name in names
    ]
    colours = [f"C{i % 10}" for i in range(len(names))]
    if len(steps) <= MAX_BARS:
        gaps = [b - a for a, b in zip(steps, steps[1:]) if b > a]
        width = 0.8 * (min(gaps) if gaps else 1)
        bottom = [0.0] * len(steps)
        for name, height, colour in zip(names, heights, colours):
            ax.bar(steps, height, width=width, bottom=bottom, color=colour, label=name)
            bottom = [b + h for b, h in zip(bottom, height)]
    elif names:  # thousands of bars draw slowly; stacked areas show the same
        ax.stackplot(steps, *heights, labels=names, colors=colours)
    if step_time:
        marker = "o" if len(step_time) <= 30 else None
        ax.plot(*zip(*step_time), "k-", marker=marker, markersize=3, label="wall s / optimizer step")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    return _finish(figure, ax, f"Timing: {s.label}")


def timing_rows(series: list[Series]) -> list[dict[str, Any]]:
    """Per series and `time/...` metric: the records that logged it and the mean and largest value,
    i.e. seconds per call (time/eval: one record per evaluation, so exactly the cost of each call)."""
    rows = []
    for s in series:
        for name in (n for n in s.metric_names() if n.startswith("time/")):
            _, values = s.values(name)
            if values:
                rows.append(
                    {
                        "series": s.label,
                        "phase": name,
                        "records": len(values),
                        "mean": math.fsum(values) / len(values),
                        "max": max(values),
                    }
                )
    return rows


def _timing_table(runs: list[Run]) -> str:
    rows = timing_rows([s for run in runs for s in run.series])
    if not rows:
        return ""
    lines = [
        "<table><tr><th>series</th><th>phase</th><th>records</th><th>mean s per call</th>"
        "<th>max s per call</th></tr>"
    ]
    lines += [
        f"<tr><td>{_e(row['series'])}</td><td>{_e(row['phase'])}</td><td class=num>{row['records']}</td>"
        f"<td class=num>{row['mean']:.3g}</td><td class=num>{row['max']:.3g}</td></tr>"
        for row in rows
    ]
    lines.append("</table>")
    return "\n".join(lines)


def _metric_sort_key(key: str) -> tuple[int, int, str]:
    for i, prefix in enumerate(METRIC_ORDER):
        if key.startswith(prefix):
            k = key[len(prefix) :]
            return (i, int(k) if k.isdigit() else 0, key)
    return (len(METRIC_ORDER), 0, key)


def evaluation_rows(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric columns, rows) over every evaluation of every run: avg@k, pass@k, maj@k first."""
    rows, keys = [], set()
    for run in runs:
        for evaluation in run.evaluations:
            sampling = evaluation.results.get("sampling", {})
            for benchmark, metrics in evaluation.results["benchmarks"].items():
                keys |= {k for k, v in metrics.items() if _is_number(v)}
                rows.append(
                    {
                        "evaluation": evaluation.label,
                        "benchmark": benchmark,
                        "n": sampling.get("n"),
                        "temperature": sampling.get("temperature"),
                        **metrics,
                    }
                )
    return sorted(keys, key=_metric_sort_key), rows


def plot_pass_at_k(rows: list[dict[str, Any]]) -> str | None:
    """pass@k against k (log2 axis), one line per evaluation and benchmark."""
    figure, ax = _figure()
    drawn = False
    for i, row in enumerate(rows):
        points = sorted(
            (int(k[5:]), v)
            for k, v in row.items()
            if k.startswith("pass@") and k[5:].isdigit() and _is_number(v)
        )
        if len(points) < 2:
            continue
        ks, values = zip(*points)
        ax.plot(ks, values, marker="o", color=f"C{i % 10}", label=f"{row['evaluation']}: {row['benchmark']}")
        drawn = True
    if not drawn:
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    return _finish(figure, ax, "pass@k (unbiased estimator)")


def plot_accuracy_bars(rows: list[dict[str, Any]]) -> str | None:
    """avg@n (the mean accuracy over all samples) per evaluation, grouped by benchmark."""
    values = [
        (row["benchmark"], row["evaluation"], v)
        for row in rows
        for k, v in row.items()
        if k.startswith("avg@") and _is_number(v)
    ]
    if not values:
        return None
    benchmarks = list(dict.fromkeys(b for b, _, _ in values))
    evaluations = list(dict.fromkeys(e for _, e, _ in values))
    figure, ax = _figure(max(5.6, 1.2 * len(benchmarks) * max(1, len(evaluations)) / 2), 3.4)
    width = 0.8 / len(evaluations)
    for j, evaluation in enumerate(evaluations):
        xs, ys = [], []
        for i, benchmark in enumerate(benchmarks):
            found = [v for b, e, v in values if b == benchmark and e == evaluation]
            if found:
                xs.append(i + (j - (len(evaluations) - 1) / 2) * width)
                ys.append(100 * found[0])
        ax.bar(xs, ys, width=width, color=f"C{j % 10}", label=evaluation)
    ax.set_xticks(range(len(benchmarks)), benchmarks)
    ax.set_ylabel("avg@n (%)")
    return _finish(figure, ax, "Evaluation accuracy")


# ------------------------------------------------------------------------------------------ completions


def _spread(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` rows, spread over the logged steps (an equal share per step, first rows first)."""
    if len(rows) <= limit:
        return rows
    by_step: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_step[row.get("step")].append(row)
    share = max(1, limit // len(by_step))
    kept = [row for group in by_step.values() for row in group[:share]]
    return kept[:limit]


def completion_rows(runs: list[Run], max_per_source: int) -> tuple[list[dict[str, Any]], int]:
    """(rows shown, rows found): training completions (reward, per-function rewards, advantage) and
    graded evaluation samples (reward = 1 if correct), at most `max_per_source` per file."""
    shown, total = [], 0
    for run in runs:
        for source, path in run.completion_files:
            rows = read_jsonl(path)
            total += len(rows)
            for row in _spread(rows, max_per_source):
                details = {f"reward {k}": v for k, v in (row.get("rewards") or {}).items()}
                details.update({k: row[k] for k in ("advantage", "finish_reason") if k in row})
                shown.append(
                    {
                        "source": source,
                        "step": row.get("step"),
                        "reward": row.get("reward"),
                        "prompt": row.get("prompt", ""),
                        "completion": row.get("completion", ""),
                        "details": details,
                    }
                )
        for evaluation in run.evaluations:
            if evaluation.samples is None:
                continue
            rows = read_jsonl(evaluation.samples)
            total += len(rows)
            for row in rows[:max_per_source]:
                details = {k: row[k] for k in ("benchmark", "gold", "answer", "finish_reason") if k in row}
                shown.append(
                    {
                        "source": evaluation.label,
                        "step": None,
                        "reward": None if "correct" not in row else float(bool(row["correct"])),
                        "prompt": row.get("question", ""),
                        "completion": row.get("completion", ""),
                        "details": details,
                    }
                )
    return shown, total


# ------------------------------------------------------------------------------------------ HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid figure { margin: 0; border: 1px solid #ddd; padding: 4px; background: #fff; }
.grid figcaption { font-size: .8em; color: #555; max-width: 560px; word-break: break-all; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
#completions td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 40em; }
#completions td.details { font-size: .8em; color: #444; }
.controls { margin: .6em 0; display: flex; gap: 1em; flex-wrap: wrap; align-items: center; }
.muted { color: #777; } pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
"""

# Filters the completions table in place; the page is complete without it.
SCRIPT = """
(function () {
  const table = document.getElementById('completions');
  if (!table) return;
  const rows = Array.from(table.tBodies[0].rows);
  const prompt = document.getElementById('filter-prompt');
  const completion = document.getElementById('filter-completion');
  const source = document.getElementById('filter-source');
  const minReward = document.getElementById('filter-reward');
  const count = document.getElementById('filter-count');
  function apply() {
    const p = prompt.value.toLowerCase(), c = completion.value.toLowerCase(), s = source.value;
    const r = minReward.value === '' ? -Infinity : parseFloat(minReward.value);
    let shown = 0;
    for (const row of rows) {
      const reward = row.dataset.reward === '' ? -Infinity : parseFloat(row.dataset.reward);
      const ok = row.cells[3].textContent.toLowerCase().includes(p)
        && row.cells[4].textContent.toLowerCase().includes(c)
        && (s === '' || row.dataset.source === s) && reward >= r;
      row.style.display = ok ? '' : 'none';
      shown += ok ? 1 : 0;
    }
    count.textContent = shown + ' of ' + rows.length + ' rows';
  }
  for (const input of [prompt, completion, source, minReward]) input.addEventListener('input', apply);
  apply();
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _number(value: Any, percent: bool = False) -> str:
    if not _is_number(value):
        return _e(value)
    if percent:
        return f"{100 * value:.1f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _img(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _runs_table(runs: list[Run]) -> str:
    lines = [
        "<table><tr><th>run</th><th>directory</th><th>trainer</th><th>series</th><th>last step</th>"
        "<th>train seconds</th><th>train loss</th></tr>"
    ]
    for run in runs:
        for s in run.series or [None]:
            last = max((r.get("step", 0) for r in s.records), default=None) if s else None
            summary = s.summary if s else {}
            lines.append(
                f"<tr><td>{_e(run.name)}</td><td>{_e(run.path)}</td><td>{_e(run.trainer)}</td>"
                f"<td>{_e(s.label if s else '')}</td><td class=num>{_e(last)}</td>"
                f"<td class=num>{_number(summary.get('train_runtime'))}</td>"
                f"<td class=num>{_number(summary.get('train_loss'))}</td></tr>"
            )
    lines.append("</table>")
    for run in runs:
        if run.recipe:
            lines.append(
                f"<details><summary>recipe of {_e(run.name)}</summary><pre>{_e(run.recipe)}</pre></details>"
            )
    return "\n".join(lines)


def _evaluation_section(runs: list[Run]) -> str:
    keys, rows = evaluation_rows(runs)
    if not rows:
        return "<p class=muted>No evaluation results (eval/*/results.json) in these runs.</p>"
    head = ["evaluation", "benchmark", "n", "temperature", *keys]
    out = [
        "<p>avg@n: mean accuracy over all n samples; pass@k: unbiased estimate of the chance that one of k "
        "samples is correct; maj@n: accuracy of the majority answer. Metrics in %.</p>",
        "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>",
    ]
    for row in rows:
        cells = [
            f"<td>{_e(row['evaluation'])}</td>",
            f"<td>{_e(row['benchmark'])}</td>",
            f"<td class=num>{_e(row['n'])}</td>",
            f"<td class=num>{_e(row['temperature'])}</td>",
        ]
        cells += [f"<td class=num>{_number(row.get(k), k.startswith(METRIC_ORDER))}</td>" for k in keys]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    images = [
        _img(uri, caption)
        for uri, caption in (
            (plot_accuracy_bars(rows), "avg@n per evaluation"),
            (plot_pass_at_k(rows), "pass@k against k"),
        )
        if uri
    ]
    if images:
        out.append('<div class="grid">' + "".join(images) + "</div>")
    return "\n".join(out)


def _completions_section(runs: list[Run], max_per_source: int) -> str:
    rows, total = completion_rows(runs, max_per_source)
    if not rows:
        return "<p class=muted>No sampled completions (completions.jsonl, eval/*/samples.jsonl) in these runs.</p>"
    sources = list(dict.fromkeys(row["source"] for row in rows))
    options = '<option value="">all sources</option>' + "".join(
        f'<option value="{_e(s)}">{_e(s)}</option>' for s in sources
    )
    out = [
        f"<p>{len(rows)} of {total} completions (at most {max_per_source} per file, spread over the steps). "
        "Training rows show the combined reward; evaluation rows show 1 for a correct answer, 0 otherwise.</p>",
        '<div class="controls">'
        '<label>prompt contains <input id="filter-prompt" type="search" placeholder="e.g. 802+"></label>'
        '<label>completion contains <input id="filter-completion" type="search"></label>'
        f'<label>source <select id="filter-source">{options}</select></label>'
        '<label>reward ≥ <input id="filter-reward" type="number" step="any" style="width:6em"></label>'
        '<span id="filter-count" class="muted"></span></div>',
        '<table id="completions"><thead><tr><th>source</th><th>step</th><th>reward</th><th>prompt</th>'
        "<th>completion</th><th>details</th></tr></thead><tbody>",
    ]
    for row in rows:
        reward = row["reward"] if _is_number(row["reward"]) else ""
        details = "<br>".join(f"{_e(k)}: {_number(v)}" for k, v in row["details"].items())
        out.append(
            f'<tr data-source="{_e(row["source"])}" data-reward="{_e(reward)}"><td>{_e(row["source"])}</td>'
            f"<td class=num>{_e(row['step'])}</td><td class=num>{_number(row['reward'])}</td>"
            f"<td class=text>{_e(row['prompt'])}</td><td class=text>{_e(row['completion'])}</td>"
            f"<td class=details>{details}</td></tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def _figures_section(runs: list[Run]) -> str:
    images = []
    for run in runs:
        for path in run.figures:
            data = path.read_bytes()
            if data[:8] != b"\x89PNG\r\n\x1a\n":
                continue
            uri = "data:image/png;base64," + base64.b64encode(data).decode()
            images.append(_img(uri, f"{run.name}/{path.relative_to(run.path).as_posix()}"))
    return '<div class="grid">' + "".join(images) + "</div>" if images else ""


def training_figures(runs: list[Run]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(caption, PNG data URI) of every training-curve panel and of every series' timing plot."""
    series = [s for run in runs for s in run.series]
    curves = [
        (f"{title}: {', '.join(dict.fromkeys(name for _, name in lines))}", uri)
        for title, lines in panel_lines(series)
        if (uri := plot_panel(title, lines, series))
    ]
    timing = [(f"timing of {s.label}", uri) for s in series if (uri := plot_timing(s))]
    return curves, timing


def render_report(
    runs: list[Run],
    max_completions: int = 1000,
    figures: tuple[list[tuple[str, str]], list[tuple[str, str]]] | None = None,
) -> str:
    """The HTML page for `runs` (see the module docstring); `figures` as `training_figures` returns."""
    curve_figures, timing_figures = figures if figures is not None else training_figures(runs)
    curves = [_img(uri, caption) for caption, uri in curve_figures]
    timing = [_img(uri, caption) for caption, uri in timing_figures]
    title = "reasoning report: " + ", ".join(run.name for run in runs)
    sections = [
        f"<h1>{_e(title)}</h1>",
        "<h2>Runs</h2>",
        _runs_table(runs),
        "<h2 id=training>Training curves</h2>",
        '<div class="grid">' + "".join(curves) + "</div>"
        if curves
        else "<p class=muted>No training metrics (metrics.jsonl) in these runs.</p>",
    ]
    if timing:
        sections += [
            "<h2 id=timing>Timing per step</h2>",
            "<p>Bars: mean seconds per call of each timed phase over the logging window (generation, weight "
            "sync, reward, ..., and an evaluation during training, time/eval, at its step); line: wall-clock "
            "seconds per optimizer step. Table: the same per phase over the run.</p>",
            '<div class="grid">' + "".join(timing) + "</div>",
            _timing_table(runs),
        ]
    sections += ["<h2 id=evaluation>Evaluation</h2>", _evaluation_section(runs)]
    figures = _figures_section(runs)
    if figures:
        sections += ["<h2 id=figures>Figures written by the runs</h2>", figures]
    sections += [
        "<h2 id=completions-section>Sampled completions</h2>",
        _completions_section(runs, max_completions),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def write_report(
    run_dirs: list[str | Path],
    output: str | Path,
    max_completions: int = 1000,
    plots_dir: str | Path | None = None,
) -> Path:
    """Read `run_dirs`, render the page and write it to `output`; returns the path written. With
    `plots_dir`, every training and timing plot is also saved there as a PNG file."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = load_runs(list(run_dirs))
    figures = training_figures(runs)
    if plots_dir is not None:
        save_pngs([*figures[0], *figures[1]], Path(plots_dir))
    html_text = render_report(runs, max_completions=max_completions, figures=figures)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(html_text, encoding="utf-8")
    return output


def save_pngs(figures: list[tuple[str, str]], folder: Path) -> list[Path]:
    """Write each (caption, PNG data URI) as `folder/<caption slug>.png`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for caption, uri in figures:
        slug = re.sub(r"[^a-z0-9]+", "_", caption.split(":")[0].lower()).strip("_")[:60] or "plot"
        path = folder / f"{slug}.png"
        index = 2
        while path in paths:
            path, index = folder / f"{slug}_{index}.png", index + 1
        path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        paths.append(path)
    return paths

"""Seeing a run: `reasoning report` on a real short GRPO run, opened in headless Chromium; the live
progress bars; `report_to` TensorBoard and W&B (offline) with the completions table.

One short run (the real `reasoning train` command, hf rollouts, 4 steps, logging every step,
evaluation before and after and every 2 steps during training) serves every test of this module.
"""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from reasoning.report import load_runs, panel_lines, render_report

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([^"]+)"')

RECIPE = """
trainer: grpo
model: {{path: {model}}}
data: {{train: "synthetic:addition?digits=3&n=200&seed=1&split=train"}}
rollout: {{engine: hf, temperature: 1.0, max_tokens: 32}}
reward: {{functions: [correctness, answer_format]}}
grpo: {{num_generations: 4, beta: 0.05}}
eval: {{benchmarks: [addition], n: 4, temperature: 1.0, limit: 8, before: true, steps: 2}}
training:
  output_dir: {output_dir}
  max_steps: 4
  per_device_train_batch_size: 8
  logging_steps: 1
  learning_rate: 1.0e-3
  save_strategy: "no"
  report_to: [tensorboard, wandb]
  seed: 0
"""


@pytest.fixture(scope="module")
def short_run(trained_tiny_dir, tmp_path_factory, run_cli):
    """(run directory, wandb directory, stderr of `reasoning train`) of one real 4-step GRPO run."""
    base = tmp_path_factory.mktemp("report")
    recipe = base / "grpo.yaml"
    recipe.write_text(RECIPE.format(model=trained_tiny_dir, output_dir=base / "run"))
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "report-test"}
    # every W&B folder (run, artefact staging, cache, settings) inside the test's directory
    env |= {key: str(base) for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    result = run_cli("train", str(recipe), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run", base / "wandb", result.stderr


def all_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the end-of-training summary: training logs and evaluations during training."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "train_runtime" not in r]


def metric_records(run_dir: Path) -> list[dict]:
    """The training logs of metrics.jsonl."""
    return [r for r in all_records(run_dir) if "time/eval" not in r]


def evaluation_records(run_dir: Path) -> list[dict]:
    """The evaluations during training (eval.steps 2 of 4 steps: at 0, 2 and 4)."""
    records = [r for r in all_records(run_dir) if "time/eval" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    return records


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian `chromium` is not installed: `make test` installs it (apt-get install chromium)")
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# Runs before the page's own script: records JS errors; after `load`, writes what it saw into the DOM
# (images decoded by the browser, completions rows, and what the prompt filter leaves) for --dump-dom.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const input = document.getElementById('filter-prompt');
  input.value = %s;
  input.dispatchEvent(new Event('input'));
  const visible = Array.from(document.querySelectorAll('#completions tbody tr'))
    .filter(row => row.style.display !== 'none').length;
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({
    images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    rows: document.querySelectorAll('#completions tbody tr').length,
    visible: visible, count: document.getElementById('filter-count').textContent,
    errors: window.__errors,
  });
  document.body.appendChild(probe);
});
</script>"""


def test_report_page_loads_in_chromium_with_every_plot(short_run, tmp_path, run_cli):
    run_dir, _, _ = short_run
    output = tmp_path / "report.html"
    result = run_cli("report", str(run_dir), "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    page = output.read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched: viewable offline

    # every plot is a PNG data URI that decodes to a non-blank image
    images = DATA_URI.findall(page)
    for caption in (
        "Accuracy: ",
        "Reward: ",
        "Response length (tokens): ",
        "KL / divergences: kl",
        "Entropy: ",
        "Clip fraction: ",
        "timing of run",
        "Evaluation during training (addition): eval/addition/avg@4, eval/addition/pass@1",
        "avg@n per evaluation",
        "pass@k against k",
    ):
        assert f"<figcaption>{caption}" in page, caption
    assert len(images) >= 11
    # the timing table: the cost of each evaluation during training, per call
    costs = [r["time/eval"] for r in evaluation_records(run_dir)]
    assert f"<td>time/eval</td><td class=num>3</td><td class=num>{sum(costs) / 3:.3g}</td>" in page
    for data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.width > 100 and image.height > 100
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 1  # something drawn

    # in the browser: no JS error, every image decoded, the prompt filter works
    prompt = jsonl(run_dir / "completions.jsonl")[0]["prompt"].splitlines()[0]  # inputs hold one line
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE % json.dumps(prompt), 1))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    probe = json.loads(
        re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S).group(1).replace("&quot;", '"')
    )
    assert probe["errors"] == []
    assert probe["images"] == len(images) and probe["decoded"] == len(images)
    training = jsonl(run_dir / "completions.jsonl")
    samples = jsonl(run_dir / "eval" / "before" / "samples.jsonl") + jsonl(
        run_dir / "eval" / "final" / "samples.jsonl"
    )
    assert probe["rows"] == len(training) + len(samples)
    expected = sum(prompt.lower() in r["prompt"].lower() for r in training)
    expected += sum(prompt.lower() in r["question"].lower() for r in samples)
    assert probe["visible"] == expected and probe["count"] == f"{expected} of {probe['rows']} rows", probe

    # the screenshot is the test artefact: a real rendering, not a blank page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        "--window-size=1400,2600", f"--screenshot={shot}", output.as_uri(), profile=tmp_path / "profile"
    )
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    screenshot = Image.open(shot)
    assert screenshot.size == (1400, 2600)
    assert len(screenshot.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 10


def test_report_tables_match_the_run_files_and_runs_overlay(short_run, tmp_path):
    run_dir, _, _ = short_run
    # a second run: the same files under another name, as when comparing two runs
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("final", "runs", "init"))
    runs = load_runs([run_dir, other])
    page = render_report(runs)
    # evaluation table: avg@4, pass@1/2/4 and maj@4 of both evaluations, in %, as in results.json
    for name in ("before", "final"):
        metrics = json.loads((run_dir / "eval" / name / "results.json").read_text())["benchmarks"]["addition"]
        cells = "".join(
            f"<td class=num>{100 * metrics[k]:.1f}</td>"
            for k in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@4")
        )
        assert (
            f"<td>run/eval/{name}</td><td>addition</td><td class=num>4</td><td class=num>1.0</td>{cells}"
            in page
        )
    # every panel overlays both runs: each line of the first run has its twin in the second
    lines = [line for _, panel in panel_lines([s for run in runs for s in run.series]) for line in panel]
    assert {name for i, name in lines if i == 0} == {name for i, name in lines if i == 1}
    names = {name for i, name in lines if i == 0}
    logged = {k for r in all_records(run_dir) for k, v in r.items() if isinstance(v, (int, float))}
    assert names == {k for k in logged if not k.startswith("time/")} - {"step", "epoch", "time"}
    assert "kl" in names and "rewards/answer_format/mean" in names and "eval/addition/maj@4" in names
    # the completions table holds every row of both runs with its reward
    rows = jsonl(run_dir / "completions.jsonl")
    assert page.count('<tr data-source="run"') == len(rows) == page.count('<tr data-source="other"')
    assert rows[0]["completion"] and f"<td class=num>{rows[0]['step']}</td>" in page


def test_training_and_evaluation_show_live_key_metrics(short_run):
    _, _, stderr = short_run
    # the tqdm bar's postfix after the last logged step: reward, accuracy, KL and seconds per step
    last = metric_records(short_run[0])[-1]
    postfix = [p for p in re.findall(r"4/4 \[([^\]]*)\]", stderr) if "reward=" in p]
    assert postfix, stderr[-3000:]
    fields = dict(re.findall(r"([\w/]+)=([^,\s]+)", postfix[-1]))
    assert {"loss", "reward", "acc", "kl", "entropy", "len", "s/step"} <= set(fields)
    assert math.isclose(float(fields["reward"]), last["reward"], rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(float(fields["acc"]), last["rewards/correctness/mean"], rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(float(fields["kl"]), last["kl"], rel_tol=1e-3, abs_tol=1e-6)
    assert "{'loss'" not in stderr  # the per-step dicts are in metrics.jsonl, not printed
    # an evaluation during training: one line above the bar, in %
    for record in evaluation_records(short_run[0]):
        avg, cost = 100 * record["eval/addition/avg@4"], record["time/eval"]
        assert re.search(
            rf"step {record['step']} eval  addition avg@4 {avg:.1f}% .*maj@4 .*\({cost:.1f} s\)", stderr
        )
    # evaluation: the benchmark bar shows the running accuracy, ending at the avg@4 of results.json
    for name in ("before", "final"):
        results = json.loads((short_run[0] / "eval" / name / "results.json").read_text())
        accuracy = 100 * results["benchmarks"]["addition"]["avg@4"]
        assert re.search(rf"addition .*8/8 accuracy {accuracy:.1f}%", stderr), stderr[-3000:]


def test_tensorboard_events_hold_the_logged_metrics_and_completions(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = short_run
    (events_dir,) = [p.parent for p in (run_dir / "runs").rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    records = metric_records(run_dir)
    for name in (
        "reward",
        "kl",
        "entropy",
        "rewards/correctness/mean",
        "clip_ratio/region",
        "time/generation",
    ):
        logged = [(r["step"], r[name]) for r in records]
        written = [(e.step, e.value) for e in accumulator.Scalars(f"train/{name}")]
        assert [s for s, _ in written] == [s for s, _ in logged]
        for (_, a), (_, b) in zip(written, logged):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), name
    for name in ("eval/addition/avg@4", "eval/addition/pass@4", "time/eval"):  # evaluations during training
        logged = [(r["step"], r[name]) for r in evaluation_records(run_dir)]
        written = [(e.step, e.value) for e in accumulator.Scalars(f"train/{name}")]
        assert [s for s, _ in written] == [s for s, _ in logged]
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for (_, a), (_, b) in zip(written, logged))
    tables = [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("completions/text_summary")]
    rows = jsonl(run_dir / "completions.jsonl")
    assert tables and "| step | prompt | completion | reward |" in tables[0]
    text = "\n".join(tables)
    assert sum(table.count("\n| ") for table in tables) == len(rows)  # every row, once
    assert rows[-1]["completion"].replace("|", "\\|").replace("\n", "⏎ ") in text


def test_wandb_offline_run_holds_the_logged_metrics_and_completions_table(short_run, tmp_path):
    run_dir, wandb_dir, _ = short_run
    (offline,) = wandb_dir.glob("offline-run-*")
    # wandb's own reader of the binary transaction log (run-*.wandb)
    inspected = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    history = [
        json.loads(x)["history"]["item"] for x in inspected.stdout.splitlines() if '"type":"history"' in x
    ]
    steps = {h["train/global_step"]: h for h in history if "train/reward" in h}
    records = metric_records(run_dir)
    assert sorted(steps) == [r["step"] for r in records]
    for record in records:
        for name in ("reward", "kl", "rewards/answer_format/mean", "completions/mean_length"):
            assert math.isclose(steps[record["step"]][f"train/{name}"], record[name], rel_tol=1e-9), name
    evaluations = {h["train/global_step"]: h for h in history if "train/eval/addition/avg@4" in h}
    assert sorted(evaluations) == [r["step"] for r in evaluation_records(run_dir)]
    for record in evaluation_records(run_dir):
        assert math.isclose(
            evaluations[record["step"]]["train/eval/addition/maj@4"], record["eval/addition/maj@4"]
        )
    tables = [h for h in history if "completions.path" in h]
    assert [t["train/global_step"] for t in tables] == [r["step"] for r in records]  # one per training log
    assert all(t["completions._type"] == "table-file" for t in tables)
    rows = []
    for table in tables:
        saved = json.loads((offline / "files" / table["completions.path"]).read_text())
        assert saved["columns"][:4] == ["step", "prompt", "completion", "reward"]
        rows += [dict(zip(saved["columns"], row)) for row in saved["data"]]
    logged = jsonl(run_dir / "completions.jsonl")
    assert [(r["step"], r["prompt"], r["completion"], r["reward"]) for r in rows] == [
        (r["step"], r["prompt"], r["completion"], r["reward"]) for r in logged
    ]

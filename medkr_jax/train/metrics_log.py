"""What a training run writes about itself: metrics.jsonl + TensorBoard, a health check, report.md + curves.

* `MetricsLogger`: one JSON line per logged step in <run>/metrics.jsonl (and TensorBoard scalars), main
  process only; on resume it drops lines past the restored step so the file is one clean curve.
* `read_metrics`: those records back.
* `RunHealth`: watches loss and update_ratio and says what is wrong with a run that finished but did not train.
* `write_report`: report.md (a summary table + the last metrics) and PNG curves of metrics.jsonl keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tensorboardX import SummaryWriter

from medkr_jax import parallel
from medkr_jax.eval.report import pyplot

# A step whose update is this many times the norm of the weights it updates (update_ratio =
# ||delta theta|| / ||theta||) is no training step: fine-tuning moves weights by ~1e-4..1e-2 of their norm per
# step and even a from-scratch tiny model at a high learning rate stays below ~0.5 (Adam's step is bounded by
# lr per coordinate), so healthy runs sit orders of magnitude below. At learning_rate=1e6 it is ~1e5.
UPDATE_RATIO_LIMIT = 10.0
# "the loss did not move": first and last loss within this fraction of each other (healthy runs that are
# long enough to matter move their loss by far more than 1%).
FLAT_LOSS_RTOL = 0.01


class MetricsLogger:
    """metrics.jsonl + TensorBoard events in the run dir (main process only)."""

    def __init__(self, output_dir: str, *, start_step: int = 0, tensorboard: bool = True):
        self.enabled = parallel.is_main_process()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        # On resume, drop lines past the restored step so the file is one clean curve.
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if int(rec.get("step", 0)) <= start_step:
                        kept.append(json.dumps(rec))
            with open(self.path, "w") as f:
                f.write("".join(k + "\n" for k in kept))
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_step + 1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            rec[k] = v if isinstance(v, (str, bool)) or v is None else float(v)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunHealth:
    """Watches the per-step loss and update_ratio; says what is wrong with a run that finished but did not
    train (update norm exploded, loss flat), so it does not end with exit code 0 and no word."""

    def __init__(self):
        self.first_loss = self.last_loss = None
        self.max_ratio, self.max_ratio_step = 0.0, None

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        loss, ratio = metrics.get("loss"), metrics.get("update_ratio")
        if isinstance(loss, float):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if isinstance(ratio, float) and math.isfinite(ratio) and ratio > self.max_ratio:
            self.max_ratio, self.max_ratio_step = ratio, step

    def warnings(self, *, lr: Any = None) -> list[str]:
        if self.max_ratio <= UPDATE_RATIO_LIMIT:
            return []
        first, last = self.first_loss, self.last_loss
        flat = first is not None and abs(last - first) <= FLAT_LOSS_RTOL * max(abs(first), 1e-12)
        loss = (f"the loss did not move ({first:.6g} -> {last:.6g})" if flat else
                f"the loss went {first:.6g} -> {last:.6g}" if first is not None else "no loss was logged")
        return [f"the run did not train: update_ratio (||delta theta|| / ||theta||) reached {self.max_ratio:.3g} at "
                f"step {self.max_ratio_step} (healthy runs stay far below {UPDATE_RATIO_LIMIT:g}) and {loss}; "
                f"config.optimizer.learning_rate={lr} is far too high"]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot_curves(output_dir: str, title: str, recs: Sequence[Mapping[str, Any]],
                 plots: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """One PNG per (metrics key, file name) that has numeric points; returns the ones written."""
    plt = pyplot()
    made = []
    for key, fname in plots:
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{title}: {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, fname), dpi=100)
        plt.close(fig)
        made.append((key, fname))
    return made


def write_report(output_dir: str, title: str, summary: Mapping[str, Any], *,
                 extra_rows: Sequence[tuple[str, Any]] = (),
                 plots: Sequence[tuple[str, str]] = (("loss", "loss.png"),)) -> str | None:
    """report.md (a summary table + the last metrics) and PNG curves of metrics.jsonl keys; main process only."""
    if not parallel.is_main_process():
        return None
    recs = read_metrics(output_dir) if os.path.exists(os.path.join(output_dir, "metrics.jsonl")) else []
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    for k in ("steps", "start_step", "preempted", "final_loss", "tokens_per_s", "wall_s", "export_dir"):
        if summary.get(k) is not None:
            lines.append(f"| {k} | {_fmt_value(summary[k])} |")
    for k, v in extra_rows:
        lines.append(f"| {k} | {_fmt_value(v)} |")
    lines += [f"\n**Warning:** {w}" for w in summary.get("warnings") or ()]
    last = summary.get("last_metrics") or {}
    if last:
        lines += ["", "## Last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt_value(v)} |" for k, v in sorted(last.items())]
    made = _plot_curves(output_dir, title, recs, plots) if recs else []
    if made:
        lines += ["", "## Curves", ""] + [f"![{k}]({f})" for k, f in made]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

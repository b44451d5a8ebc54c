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
# A format collapse (RL runs that log format_rate): the share of completions in the rewarded answer format, having
# reached FORMAT_COLLAPSE_FROM, falls below FORMAT_COLLAPSE_FACTOR of its best so far in one step or more. Measured
# on the GRPO tests' toy policy at a learning rate at the edge of stability: 0.94 -> 0.06 in one step (it stopped
# closing its answers and ran to max_new_tokens), where healthy runs of the same tests stay at or above 0.80.
FORMAT_COLLAPSE_FROM = 0.5
FORMAT_COLLAPSE_FACTOR = 0.5


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
    """Watches the per-step loss, update_ratio and (RL runs) format_rate; says what is wrong with a run that
    finished but did not train (update norm exploded, loss flat) or whose policy lost the answer format on the way
    (a format collapse), so it does not end with exit code 0 and no word."""

    def __init__(self):
        self.first_loss = self.last_loss = None
        self.max_ratio, self.max_ratio_step = 0.0, None
        self.best_format = self.best_format_step = self.last_format = None
        self.collapse: dict[str, Any] | None = None  # the first format collapse
        self.collapsed_steps = 0

    def observe(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Take one step's metrics; returns a one-line message when this step collapses the format (see
        FORMAT_COLLAPSE_FROM), for the loop to print at once, else None."""
        loss, ratio = metrics.get("loss"), metrics.get("update_ratio")
        if isinstance(loss, float):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if isinstance(ratio, float) and math.isfinite(ratio) and ratio > self.max_ratio:
            self.max_ratio, self.max_ratio_step = ratio, step
        return self._observe_format(step, metrics)

    def _observe_format(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        fmt = metrics.get("format_rate")
        if not isinstance(fmt, (int, float)) or not math.isfinite(fmt):
            return None
        best, message = self.best_format, None
        self.last_format = float(fmt)
        if best is not None and best >= FORMAT_COLLAPSE_FROM and fmt < FORMAT_COLLAPSE_FACTOR * best:
            self.collapsed_steps += 1
            length = metrics.get("response_length")
            event = {"step": step, "from": best, "from_step": self.best_format_step, "to": float(fmt),
                     "response_length": float(length) if isinstance(length, (int, float)) else None}
            self.collapse = self.collapse or event
            message = (f"step {step}: format_rate fell to {fmt:.2f} from {best:.2f} (step {self.best_format_step})"
                       + (f"; completions {length:.1f} tokens long on average" if event["response_length"] is not None
                          else ""))
        if best is None or fmt > best:
            self.best_format, self.best_format_step = float(fmt), step
        return message

    def warnings(self, *, lr: Any = None) -> list[str]:
        out = []
        if self.max_ratio > UPDATE_RATIO_LIMIT:
            first, last = self.first_loss, self.last_loss
            flat = first is not None and abs(last - first) <= FLAT_LOSS_RTOL * max(abs(first), 1e-12)
            loss = (f"the loss did not move ({first:.6g} -> {last:.6g})" if flat else
                    f"the loss went {first:.6g} -> {last:.6g}" if first is not None else "no loss was logged")
            out.append(f"the run did not train: update_ratio (||delta theta|| / ||theta||) reached "
                       f"{self.max_ratio:.3g} at step {self.max_ratio_step} (healthy runs stay far below "
                       f"{UPDATE_RATIO_LIMIT:g}) and {loss}; config.optimizer.learning_rate={lr} is far too high")
        if self.collapse is not None:
            c = self.collapse
            length = (f" (completions {c['response_length']:.1f} tokens long on average)"
                      if c["response_length"] is not None else "")
            out.append(f"the policy lost the answer format: format_rate reached {c['from']:.2f} at step "
                       f"{c['from_step']} and fell to {c['to']:.2f} at step {c['step']}{length}; "
                       f"{self.collapsed_steps} step(s) below {FORMAT_COLLAPSE_FACTOR:g} x its best, "
                       f"{self.last_format:.2f} at the last step. "
                       f"Collapses like this follow a learning rate at the edge of stability "
                       f"(config.optimizer.learning_rate={lr}): a lower one, or a KL penalty (config.grpo.beta), "
                       f"keeps the format; metrics.jsonl has format_rate and response_length per step")
        return out


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

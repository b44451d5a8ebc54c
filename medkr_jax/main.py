"""The one entry point: python -m medkr_jax.main --config configs/<job>.py[:arg] [--config.key=value ...]

`config.job` picks what runs (medkr_jax.jobs). A short header (job, model, data, output folder) is printed;
the resolved config is written to <output_dir>/config.json (and printed with --print_config), so every run
folder says exactly how it was made.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

from medkr_jax.host_memory import reuse_freed_memory
from medkr_jax.jobs import JOBS, UnknownJob, job_function


class UsageError(Exception):
    """A problem with the command line or the config, reported as one line."""


def parse_config(argv: list[str]):
    """Parse --config and its overrides with ml_collections.config_flags; one-line errors."""
    from absl import flags
    from ml_collections import config_flags

    argv = [_comma_list_override(a) for a in argv]
    fv = flags.FlagValues()
    # sys_argv: the override flags (--config.x=...) are found in `argv`, not in the process's sys.argv
    config_flags.DEFINE_config_file("config", None, "path to a config file under configs/", lock_config=True,
                                    flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        config = fv.config
        if config is not None:
            config.get("job")  # config files load lazily: surface a missing/broken file here
    except (KeyError, AttributeError) as err:
        raise UsageError(_unknown_key_error(err, argv)) from None
    except flags.Error as err:
        raise UsageError(_short_flag_error(err)) from None
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"bad config: {_first_line(err)}") from None
    if config is None:
        raise UsageError("missing --config=configs/<job>.py")
    return config, fv["config"].config_filename


def _comma_list_override(arg: str) -> str:
    """``--config.data.benchmarks=a:x,b:y`` (a comma-separated list for a key of config.COMMA_LIST_KEYS) as the
    tuple literal ml_collections parses; Python literals and other flags pass unchanged."""
    from medkr_jax.config import COMMA_LIST_KEYS, split_comma_list

    key, eq, value = arg.partition("=")
    key = key.removeprefix("--config.")
    if not eq or not arg.startswith("--config.") or key not in COMMA_LIST_KEYS or "," not in value:
        return arg
    try:
        ast.literal_eval(value)
        return arg  # already a literal: ('a', 'b')
    except (ValueError, SyntaxError):
        return f"--config.{key}={split_comma_list(key, value)!r}"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:1] + [line for line in lines[1:] if "Errno" in line])


def _unknown_key_error(err: Exception, argv: list[str]) -> str:
    text = str(err.args[0]) if err.args else str(err)
    text = text.replace("\\n", "\n").replace("\\'", "'")  # nested KeyError reprs
    lines = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
    key = lines[0] if lines else text
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                 a.split("=")[0].rsplit(".", 1)[-1] == key), f"--config.<...>.{key}")
    hint = next((line for line in lines if "Did you mean" in line), "")
    return f"unknown config key in {flag}: {key!r} is not a key of the config" + (f"; {hint}" if hint else "")


def _short_flag_error(err: Exception) -> str:
    text = str(err).strip().splitlines()
    msg = next((line for line in text if line.strip()), str(err))
    for line in text:
        if "not found" in line.lower() or "did you mean" in line.lower() or "could not" in line.lower():
            msg = line.strip()
    return msg


def resolve_output_dir(config, config_file: str) -> str:
    if not config.output_dir:
        stem = Path(config_file.split(":")[0]).stem
        with config.unlocked():
            config.output_dir = os.path.join("runs", stem)
    return config.output_dir


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _docstring_line(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (SyntaxError, OSError, UnicodeDecodeError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    """--help: how to run, the jobs, and the configs under configs/ with the first line of their docstring."""
    lines = [__doc__.strip().splitlines()[0], "", "  --config=configs/<file>.py   the run's config (required)",
             "  --config.<key>=<value>       override any key, e.g. --config.model.path=/models/x "
             "--config.output_dir=runs/x", "  --config.data.benchmarks=a:/x.jsonl,b:/y.jsonl   lists: "
             "comma-separated or a tuple literal", "  --print_config               print the whole resolved config "
             "(it is always written to <output_dir>/config.json)", "", "jobs (config.job):"]
    lines += [f"  {name:<12} {target}" for name, target in JOBS.items()]
    configs = sorted(CONFIG_DIR.glob("*.py")) if CONFIG_DIR.is_dir() else []
    lines += ["", f"configs ({CONFIG_DIR}):"] if configs else []
    lines += [f"  {p.name:<18} {_docstring_line(p)}" for p in configs if not p.name.startswith("_")]
    return "\n".join(lines)


HEADER_KEYS = ("model.preset", "model.path", "tokenizer_path", "data.benchmarks", "data.eval_path", "sft.train_path",
               "grpo.train_path", "classifier.train_path", "split.classifier_path", "pipeline.stages")


def config_header(config, config_file: str, out: str) -> str:
    """What a run starts with: job, config file, output folder, and the model and data keys that are set."""
    lines = [f"[medkr_jax] job={config.job} config={config_file} output_dir={out}"]
    for key in HEADER_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node:
            lines.append(f"  {key}: {', '.join(map(str, node)) if isinstance(node, tuple) else node}")
    lines.append(f"  full config: {os.path.join(out, 'config.json')} (--print_config prints it here)")
    return "\n".join(lines)


def prepare_output_dir(out: str, config, config_file: str) -> None:
    """Create output_dir and write config.json; one UsageError when it is a file or cannot be written."""
    from etils import epath  # local paths and gs:// alike

    try:
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        (epath.Path(out) / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    except (FileExistsError, NotADirectoryError) as err:
        raise UsageError(f"config.output_dir={out!r} cannot be a run folder: {err.filename or out} is a file, "
                         "not a folder; choose another --config.output_dir") from None
    except OSError as err:
        raise UsageError(f"config.output_dir={out!r} cannot be written ({err.strerror or err}: "
                         f"{err.filename or out}); choose a writable --config.output_dir") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    print_full = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
        print(usage())
        return 0
    try:
        config, config_file = parse_config(argv)
        fn = job_function(config.job)
    except (UsageError, UnknownJob) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from medkr_jax import parallel

    if parallel.initialize_distributed(config) and not config.output_dir and config.job != "dry_run":
        # every host must write to the same place (gs:// or a shared filesystem); a local default is wrong
        print("error: a multi-process run needs --config.output_dir (gs://... or a shared filesystem)",
              file=sys.stderr)
        return 2
    out = resolve_output_dir(config, config_file)
    from medkr_jax.jobs.common import resolve_model_path  # imports jax: after --help and config errors

    resolve_model_path(config)
    if parallel.is_main_process():
        try:
            prepare_output_dir(out, config, config_file)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(config_header(config, config_file, out))
        if print_full:
            print(config)
    start = time.time()
    try:
        summary = fn(config)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training after a step and saves)
        print(f"[medkr_jax] interrupted (Ctrl-C); checkpoints already in {out} are kept: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    except Exception as err:  # user errors from deep inside a job: one clear line, non-zero exit
        from medkr_jax.config import ConfigError
        from medkr_jax.pipeline.runner import StagePreempted

        if isinstance(err, StagePreempted):  # saved and resumable: say so, exit like a terminated process
            print(f"[medkr_jax] {err}", file=sys.stderr)
            return 130 if err.signal_name == "SIGINT" else 143
        # FloatingPointError: train.loop.TrainingDiverged, whose message names the last good checkpoint
        if isinstance(err, (ConfigError, FileNotFoundError, ValueError, KeyError, FloatingPointError)) and \
                not os.environ.get("MEDKR_TRACEBACK"):
            print(f"error: {type(err).__name__}: {err}\n(set MEDKR_TRACEBACK=1 for the traceback)", file=sys.stderr)
            return 1
        raise
    if (summary or {}).get("preempted"):  # stopped by SIGTERM or a first Ctrl-C after saving: resumable
        by = summary.get("preempted_by") or "SIGTERM"
        print(f"[medkr_jax] stopped by {by} at step {summary.get('steps')} after saving a checkpoint in {out}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130 if by == "SIGINT" else 143
    if parallel.is_main_process():
        print(f"[medkr_jax] job={config.job} done in {time.time() - start:.1f}s")
        if summary:
            print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # The process's malloc policy (medkr_jax.host_memory), before any job starts XLA's threads; here rather
    # than in main(), which tests call inside their own processes.
    reuse_freed_memory()
    sys.exit(main())

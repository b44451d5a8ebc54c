"""Append-only JSONL log of finished generations, so a killed evaluation resumes where it stopped.

One line per item (a question, or a question x adversarial variant) with all of its samples, written
and fsynced as the engine streams finished items (a few at a time). On restart the finished keys are skipped. A line cut off by
a kill is dropped (the file is truncated back to the last complete line). The settings that decide what
a generation is (model, prompt, sampling ...) are stored beside the log; resuming with different settings
is refused rather than mixing two experiments in one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class ResumeError(ValueError):
    """An existing generation log was made with different settings."""


class GenerationLog:
    """Finished items by key, backed by ``path`` (JSONL) and ``path.settings.json``."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], *, writable: bool = True):
        self.path = Path(path)
        self.settings_path = self.path.with_name(self.path.name + ".settings.json")
        self.writable = writable
        settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        if self.settings_path.exists():
            old = json.loads(self.settings_path.read_text())
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ResumeError(
                    f"{self.path} was written with different settings ({', '.join(diff)} differ; see "
                    f"{self.settings_path}); use a new output_dir or delete both files to start over")
        elif writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.entries: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # no newline: a line cut off mid-write
            line = data[pos:nl]
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.entries[entry["key"]] = entry
            pos = good_end = nl + 1
        if good_end < len(data) and self.writable:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entries: Iterable[dict]) -> None:
        """Write finished items (each with a unique "key") and make them durable before returning."""
        entries = list(entries)
        for e in entries:
            if e["key"] in self.entries:
                raise ValueError(f"item {e['key']!r} is already in {self.path}; it must not be generated twice")
        if self.writable and entries:
            with open(self.path, "a", encoding="utf-8") as f:
                for e in entries:
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for e in entries:
            self.entries[e["key"]] = e

"""Job "import": a llama.cpp GGUF file -> a Hugging Face model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medkr_jax.models.gguf import convert_gguf
from medkr_jax.models.presets import packaged_gguf


def run(config) -> dict:
    """config.import_.gguf_path ("" = the packaged GGUF of config.model.preset, by default smollm2-135m's)
    -> config.import_.out_dir ("" = <output_dir>/hf). Returns a summary dict."""
    section = config.import_
    if section.gguf_path:
        gguf_path = Path(section.gguf_path)
    else:  # a preset whose GGUF ships in pip packages (qwen2.5-coder-0.5b's is joined from its parts first)
        gguf_path = packaged_gguf(config.model.preset or "smollm2-135m", config.model.cache_dir or None)
    out_dir = section.out_dir or os.path.join(config.output_dir or ".", "hf")
    out = convert_gguf(gguf_path, out_dir)
    cfg = json.loads((out / "config.json").read_text())
    summary = {"gguf_path": str(gguf_path), "out_dir": str(out), "architecture": cfg["architectures"][0],
               "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
               "vocab_size": cfg["vocab_size"]}
    print(f"converted {gguf_path} -> {out} ({summary['architecture']}, {summary['num_layers']} layers)")
    return summary

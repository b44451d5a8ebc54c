"""Pipelines of jobs: stages that each prepare one job's config from the run config and earlier stages' files.

  stages.py        the stage registry and the helpers every stage uses (job config, run a job, results)
  runner.py        runs config.pipeline.stages in order, resuming completed ones
  demo.py          the demo's stages (synthetic world, classifier, MMLU split, tiny policy SFT -> GRPO)
  recipe.py        the real-model recipe (STaR traces, SFT then GRPO of SmolLM2 on MMLU)
  report.py        report.md, and the readers of stage outputs the study shares
  study.py         the multi-seed ablation study's stages and job; study_report.py its report

Importing the package registers every stage.
"""

from medkr_jax.pipeline import demo, recipe, report, study  # noqa: F401  (register their stages)

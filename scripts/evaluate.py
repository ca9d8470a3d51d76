"""Snakemake script: evaluate the run and write metrics.json."""

from pathlib import Path

from agentprune import families, steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.evaluate(
        families.build_step("evaluate", snakemake.params.step, "evaluate"),
        dict(snakemake.wildcards),
        snakemake.input.plan,
        snakemake.input.base_metrics,
        snakemake.input.prune_report,
        snakemake.input.finetune_report,
        Path(snakemake.input.pruned).with_suffix(""),
        Path(snakemake.input.finetuned).with_suffix(""),
        snakemake.output[0],
    )

"""Snakemake script: carry plan.json out on the base model."""

from pathlib import Path

from agentprune import steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.prune(
        snakemake.config,
        snakemake.input.plan,
        Path(snakemake.input.weights).with_suffix(""),
        Path(snakemake.output.weights).with_suffix(""),
        snakemake.output.report,
    )

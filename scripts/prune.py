"""Snakemake script: carry plan.json out on the base model."""

from pathlib import Path

from agentprune import families, steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.prune(
        families.build_step("prune", snakemake.params.step, "prune"),
        snakemake.input.plan,
        Path(snakemake.input.weights).with_suffix(""),
        Path(snakemake.output.weights).with_suffix(""),
        snakemake.output.report,
    )

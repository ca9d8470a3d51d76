"""Snakemake script: recovery fine-tuning of the pruned model."""

from pathlib import Path

from agentprune import steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.finetune(
        snakemake.config,
        snakemake.input.plan,
        Path(snakemake.input.weights).with_suffix(""),
        Path(snakemake.input.base_weights).with_suffix(""),
        Path(snakemake.output.weights).with_suffix(""),
        snakemake.output.report,
    )

"""Snakemake script: profile the base model into profile.json."""

from pathlib import Path

from agentprune import steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.profile(
        snakemake.config, Path(snakemake.input.weights).with_suffix(""), snakemake.output[0]
    )

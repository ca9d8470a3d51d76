"""Snakemake script: profile the base model into profile.json."""

from pathlib import Path

from agentprune import steps
from agentprune.settings import ProfileStep, build

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.profile(
        build(ProfileStep, snakemake.params.step, "profile"),
        Path(snakemake.input.weights).with_suffix(""),
        snakemake.output[0],
    )

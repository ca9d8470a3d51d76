"""Snakemake script: profile the base model into profile.json."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.profile(
        families.build_step("profile", snakemake.params.step, "profile"),
        Path(snakemake.input.weights).with_suffix(""),
        snakemake.output[0],
    )

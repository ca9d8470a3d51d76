"""Snakemake script: the method's planner writes plan.json."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

# No threads to logged(): it would import torch, which the fixed recipes never need.
with steps.logged(snakemake.log[0]):
    steps.plan(
        families.build_step("plan", snakemake.params.step, "plan"),
        int(snakemake.wildcards.seed),
        snakemake.input.profile,
        snakemake.output[0],
        base_stem=Path(snakemake.input.weights).with_suffix(""),
        threads=snakemake.threads,
    )

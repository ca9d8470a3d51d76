"""Snakemake script: the method's planner writes plan.json."""

from agentprune import steps

with steps.logged(snakemake.log[0]):
    steps.plan(
        snakemake.config,
        snakemake.wildcards.method,
        snakemake.wildcards.model,
        float(snakemake.wildcards.ratio),
        int(snakemake.wildcards.seed),
        snakemake.input.profile,
        snakemake.output[0],
    )

"""Snakemake script: one run's metrics as an HTML card for the report."""

from agentprune import run_card, steps

with steps.logged(snakemake.log[0]):
    run_card.write_run_card(snakemake.input.metrics, snakemake.input.plan, snakemake.output[0])

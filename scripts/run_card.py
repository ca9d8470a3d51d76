"""Snakemake script: one run's metrics as an HTML card for the report."""

from agentprune import run_card, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    run_card.write_run_card(snakemake.input.metrics, snakemake.input.plan, snakemake.output[0])

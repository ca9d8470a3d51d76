"""Snakemake script: each run's metrics as an HTML card for the report (every run of the job)."""

from agentprune import run_card, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    for metrics, plan, card in zip(
        snakemake.input.metrics, snakemake.input.plan, snakemake.output, strict=True
    ):
        run_card.write_run_card(metrics, plan, card)

"""Snakemake script: a multi-agent plan's transcript as an HTML page for the report."""

from agentprune import steps, transcript, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    transcript.write_transcript(snakemake.input.plan, snakemake.output[0])

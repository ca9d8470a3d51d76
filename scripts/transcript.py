"""Snakemake script: each multi-agent plan's transcript as an HTML page for the report (every run
of the job)."""

from agentprune import steps, transcript, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    for plan, page in zip(snakemake.input.plan, snakemake.output, strict=True):
        transcript.write_transcript(plan, page)

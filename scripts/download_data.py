"""Snakemake script: fetch (if downloadable) and describe the data set."""

from agentprune import steps

with steps.logged(snakemake.log[0]):
    steps.prepare_dataset(snakemake.config, snakemake.output[0])

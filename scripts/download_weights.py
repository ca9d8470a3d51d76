"""Snakemake script: fetch a model's pretrained weights into the cache and verify them."""

from agentprune import steps

with steps.logged(snakemake.log[0]):
    steps.download_weights(snakemake.config, snakemake.wildcards.model, snakemake.output[0])

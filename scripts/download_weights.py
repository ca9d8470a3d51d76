"""Snakemake script: fetch a model's pretrained weights into the cache and verify them."""

from agentprune import steps
from agentprune.settings import WeightsEntry, build

with steps.logged(snakemake.log[0]):
    entry = build(WeightsEntry, snakemake.params.weights, f"models.{snakemake.wildcards.model}")
    steps.download_weights(entry, snakemake.output.manifest, link=snakemake.output.weights)

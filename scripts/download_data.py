"""Snakemake script: fetch (if downloadable) and describe the data set."""

from agentprune import steps
from agentprune.settings import DataSettings, build

with steps.logged(snakemake.log[0]):
    settings = build(DataSettings, snakemake.params.data, "dataset")
    steps.prepare_dataset(settings, snakemake.output[0])

"""Snakemake script: fetch (if downloadable) and describe the data set."""

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    settings = families.build_step("dataset", snakemake.params.data, "dataset")
    steps.prepare_dataset(settings, snakemake.output[0])

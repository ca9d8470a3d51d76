"""Snakemake script: fetch a model's pretrained weights into the cache and verify them."""

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0]):
    entry = families.build_step(
        "weights", snakemake.params.weights, f"models.{snakemake.wildcards.model}"
    )
    steps.download_weights(entry, snakemake.output.manifest, link=snakemake.output.weights)

"""Snakemake script: the base model, from verified pretrained weights or trained from scratch."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.base_model(
        families.build_step("download_model", snakemake.params.step, "download_model"),
        Path(snakemake.output.weights).with_suffix(""),
        snakemake.output.metrics,
        weights_json=snakemake.input.weights[0] if snakemake.input.weights else None,
    )

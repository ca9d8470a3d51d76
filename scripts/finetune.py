"""Snakemake script: recovery fine-tuning of the pruned model.

A job given several GPUs (``resources: gpu: N`` in the profile) trains with DDP: the step re-runs
itself under torchrun with one process per GPU.
"""

from pathlib import Path

from agentprune import distributed, families, steps

with steps.logged(snakemake.log[0], snakemake.threads):
    steps.finetune(
        families.build_step("finetune", snakemake.params.step, "finetune"),
        snakemake.input.plan,
        Path(snakemake.input.weights).with_suffix(""),
        Path(snakemake.input.base_weights).with_suffix(""),
        Path(snakemake.output.weights).with_suffix(""),
        snakemake.output.report,
        processes=distributed.requested_processes(snakemake.resources.get("gpu", 0)),
    )

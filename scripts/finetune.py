"""Snakemake script: recovery fine-tuning of each pruned model of the job.

A job given several GPUs (``resources: gpu: N`` in the profile) trains with DDP: the step re-runs
itself under torchrun with one process per GPU.
"""

from pathlib import Path

from agentprune import distributed, families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

step = families.build_step("finetune", snakemake.params.step, "finetune")
processes = distributed.requested_processes(snakemake.resources.get("gpu", 0))
with steps.logged(snakemake.log[0], snakemake.threads):
    for seed, plan, pruned, finetuned, report in zip(
        snakemake.params.seeds,
        snakemake.input.plan,
        snakemake.input.weights,
        snakemake.output.weights,
        snakemake.output.report,
        strict=True,
    ):
        print(f"--- seed {seed}", flush=True)
        steps.finetune(
            step,
            plan,
            Path(pruned).with_suffix(""),
            Path(snakemake.input.base_weights).with_suffix(""),
            Path(finetuned).with_suffix(""),
            report,
            processes=processes,
        )

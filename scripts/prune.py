"""Snakemake script: carry each run's plan.json out on the base model (every run of the job)."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

step = families.build_step("prune", snakemake.params.step, "prune")
with steps.logged(snakemake.log[0], snakemake.threads):
    for seed, plan, weights, report in zip(
        snakemake.params.seeds,
        snakemake.input.plan,
        snakemake.output.weights,
        snakemake.output.report,
        strict=True,
    ):
        print(f"--- seed {seed}", flush=True)
        steps.prune(
            step,
            plan,
            Path(snakemake.input.weights).with_suffix(""),
            Path(weights).with_suffix(""),
            report,
        )

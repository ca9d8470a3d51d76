"""Snakemake script: the method's planner writes each run's plan.json (every run of the job)."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

step = families.build_step("plan", snakemake.params.step, "plan")
# No threads to logged(): it would import torch, which the fixed recipes never need.
with steps.logged(snakemake.log[0]):
    for seed, plan in zip(snakemake.params.seeds, snakemake.output, strict=True):
        print(f"--- seed {seed}", flush=True)
        steps.plan(
            step,
            int(seed),
            snakemake.input.profile,
            plan,
            base_stem=Path(snakemake.input.weights).with_suffix(""),
            threads=snakemake.threads,
        )

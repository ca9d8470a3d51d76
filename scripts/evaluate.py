"""Snakemake script: evaluate each run of the job and write its metrics.json."""

from pathlib import Path

from agentprune import families, steps, worker

worker.hand_off(snakemake)  # run in the warm worker, where one serves

step = families.build_step("evaluate", snakemake.params.step, "evaluate")
inputs, outputs = snakemake.input, snakemake.output
with steps.logged(snakemake.log[0], snakemake.threads):
    for i, seed in enumerate(snakemake.params.seeds):
        print(f"--- seed {seed}", flush=True)
        steps.evaluate(
            step,
            {**dict(snakemake.wildcards), "seed": str(seed)},
            inputs.plan[i],
            inputs.base_metrics,
            inputs.prune_report[i],
            inputs.finetune_report[i],
            Path(inputs.pruned[i]).with_suffix(""),
            Path(inputs.finetuned[i]).with_suffix(""),
            outputs.metrics[i],
        )

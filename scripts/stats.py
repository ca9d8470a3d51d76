"""Snakemake script: aggregate the runs' metrics.json into results/stats/*.csv."""

from pathlib import Path

from agentprune.stats import write_stats

write_stats(
    snakemake.input.metrics,
    Path(snakemake.output.runs).parent,
    confidence=snakemake.params.stats["confidence"],
    alpha=snakemake.params.stats["alpha"],
)

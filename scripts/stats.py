"""Snakemake script: the runs' metrics.json and benchmark files -> results/stats/*.csv."""

from pathlib import Path

from agentprune.benchmarks import write_benchmarks
from agentprune.stats import write_stats

write_stats(
    snakemake.input.metrics,
    Path(snakemake.output.runs).parent,
    confidence=snakemake.params.stats["confidence"],
    alpha=snakemake.params.stats["alpha"],
)
write_benchmarks(snakemake.input.benchmarks, snakemake.output.benchmarks)

"""Snakemake script: the runs' metrics.json and benchmark files -> results/stats/*.csv."""

from agentprune.benchmarks import write_benchmarks
from agentprune.settings import StatsSettings, build
from agentprune.stats import write_stats

write_stats(
    snakemake.input.metrics,
    dict(snakemake.output.items()),
    build(StatsSettings, snakemake.params.settings, "stats"),
)
write_benchmarks(
    snakemake.input.benchmarks, snakemake.output.benchmarks, logs=snakemake.input.job_logs
)

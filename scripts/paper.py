"""Snakemake script: render the paper's tables and figures into results/paper/."""

from pathlib import Path

from agentprune.paper import TEMPLATES, render_paper

render_paper(
    snakemake.input.runs,
    snakemake.input.summary,
    snakemake.input.comparisons,
    out_dir=Path(snakemake.output.md).parents[1],
    templates_dir=TEMPLATES,
    reference_method=snakemake.params.reference_method,
    references=snakemake.params.references,
    benchmarks_csv=snakemake.input.benchmarks,
    ablations=snakemake.params.ablations,
)

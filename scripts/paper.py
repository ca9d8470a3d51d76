"""Snakemake script: render the paper's tables and figures to the rule's named outputs."""

from agentprune.paper import TEMPLATES, render_paper
from agentprune.settings import PaperSettings, build

render_paper(
    snakemake.input.runs,
    snakemake.input.summary,
    snakemake.input.comparisons,
    outputs=dict(snakemake.output.items()),
    templates_dir=TEMPLATES,
    settings=build(PaperSettings, snakemake.params.settings, "paper"),
    benchmarks_csv=snakemake.input.benchmarks,
)

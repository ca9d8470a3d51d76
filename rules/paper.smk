# paper: the final rule. Tables (jinja2) and figures (seaborn), each registered in the HTML report.
# Its outputs are the one list of the paper's files: rule all and the report read them from here,
# and the renderer writes each to the path Snakemake names.


rule paper:
    input:
        runs=f"{STATS}/runs.csv",
        summary=f"{STATS}/summary.csv",
        comparisons=f"{STATS}/comparisons.csv",
        benchmarks=f"{STATS}/benchmarks.csv",
    output:
        results_md=paper_table("results", "markdown"),
        results_tex=paper_table("results", "latex"),
        results_html=paper_table("results", "html"),
        comparisons_md=paper_table("comparisons", "markdown"),
        comparisons_html=paper_table("comparisons", "html"),
        unstructured_md=paper_table("unstructured", "markdown"),
        unstructured_tex=paper_table("unstructured", "latex"),
        unstructured_html=paper_table("unstructured", "html"),
        lm_md=paper_table("lm", "markdown"),
        lm_tex=paper_table("lm", "latex"),
        lm_html=paper_table("lm", "html"),
        accuracy_vs_sparsity=paper_figure(
            "accuracy_vs_sparsity", "accuracy vs sparsity"
        ),
        accuracy_vs_macs=paper_figure("accuracy_vs_macs", "accuracy vs MACs"),
        method_comparison=paper_figure("method_comparison", "method comparison"),
        time_per_step=paper_figure("time_per_step", "time per step"),
        time_memory_per_step=paper_figure(
            "time_memory_per_step", "job time and memory per step"
        ),
        perplexity_vs_sparsity=paper_figure(
            "perplexity_vs_sparsity", "perplexity vs sparsity"
        ),
    log:
        f"{LOGS}/paper.log",
    conda:
        "../envs/report.yaml"
    params:
        settings=paper_params(),
    script:
        "../scripts/paper.py"

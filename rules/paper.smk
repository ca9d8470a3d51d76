# paper: the final rule. Tables (jinja2) and figures (seaborn), each registered in the HTML report.


rule paper:
    input:
        runs=STATS + "/runs.csv",
        summary=STATS + "/summary.csv",
        comparisons=STATS + "/comparisons.csv",
        benchmarks=STATS + "/benchmarks.csv",
    output:
        md=report(
            PAPER + "/tables/results.md",
            caption="../workflow/report/table_results.rst",
            category="Tables",
            labels={"table": "results", "format": "markdown"},
        ),
        tex=report(
            PAPER + "/tables/results.tex",
            caption="../workflow/report/table_results.rst",
            category="Tables",
            labels={"table": "results", "format": "latex"},
        ),
        html=report(
            PAPER + "/tables/results.html",
            caption="../workflow/report/table_results.rst",
            category="Tables",
            labels={"table": "results", "format": "html"},
        ),
        comparisons=report(
            PAPER + "/tables/comparisons.md",
            caption="../workflow/report/table_comparisons.rst",
            category="Tables",
            labels={"table": "comparisons", "format": "markdown"},
        ),
        comparisons_html=report(
            PAPER + "/tables/comparisons.html",
            caption="../workflow/report/table_comparisons.rst",
            category="Tables",
            labels={"table": "comparisons", "format": "html"},
        ),
        unstructured_md=report(
            PAPER + "/tables/unstructured.md",
            caption="../workflow/report/table_unstructured.rst",
            category="Tables",
            labels={"table": "unstructured", "format": "markdown"},
        ),
        unstructured_tex=report(
            PAPER + "/tables/unstructured.tex",
            caption="../workflow/report/table_unstructured.rst",
            category="Tables",
            labels={"table": "unstructured", "format": "latex"},
        ),
        unstructured_html=report(
            PAPER + "/tables/unstructured.html",
            caption="../workflow/report/table_unstructured.rst",
            category="Tables",
            labels={"table": "unstructured", "format": "html"},
        ),
        sparsity=report(
            PAPER + "/figures/accuracy_vs_sparsity.png",
            caption="../workflow/report/fig_accuracy_vs_sparsity.rst",
            category="Figures",
            labels={"figure": "accuracy vs sparsity"},
        ),
        accuracy=report(
            PAPER + "/figures/accuracy_vs_macs.png",
            caption="../workflow/report/fig_accuracy_vs_macs.rst",
            category="Figures",
            labels={"figure": "accuracy vs MACs"},
        ),
        comparison=report(
            PAPER + "/figures/method_comparison.png",
            caption="../workflow/report/fig_method_comparison.rst",
            category="Figures",
            labels={"figure": "method comparison"},
        ),
        timing=report(
            PAPER + "/figures/time_per_step.png",
            caption="../workflow/report/fig_time_per_step.rst",
            category="Figures",
            labels={"figure": "time per step"},
        ),
        resources=report(
            PAPER + "/figures/time_memory_per_step.png",
            caption="../workflow/report/fig_time_memory_per_step.rst",
            category="Figures",
            labels={"figure": "job time and memory per step"},
        ),
    params:
        reference_method=config["paper"]["reference_method"],
        references=config["paper"]["references"],
        # method -> its ablation (multi_agent -> agents_heuristic), paired in the results table.
        ablations=ablation_pairs(),
    log:
        LOGS + "/paper.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/paper.py"

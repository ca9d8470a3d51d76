# stats: one table of runs, per-cell summaries with CIs, and paired comparisons between methods.


rule stats:
    input:
        metrics=all_metrics(),
        benchmarks=run_benchmarks(),
    output:
        runs=STATS + "/runs.csv",
        summary=STATS + "/summary.csv",
        comparisons=STATS + "/comparisons.csv",
        benchmarks=STATS + "/benchmarks.csv",
    params:
        stats=config["stats"],
    log:
        LOGS + "/stats.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/stats.py"

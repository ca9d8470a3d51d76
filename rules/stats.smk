# stats: one table of runs, per-cell summaries with CIs, and paired comparisons between methods.


rule stats:
    input:
        metrics=all_metrics(),
        benchmarks=run_benchmarks(),
        # Their jobs' logs: a job the warm worker ran has its child's CPU and memory there.
        job_logs=run_benchmark_logs(),
    output:
        runs=f"{STATS}/runs.csv",
        summary=f"{STATS}/summary.csv",
        comparisons=f"{STATS}/comparisons.csv",
        benchmarks=f"{STATS}/benchmarks.csv",
    log:
        f"{LOGS}/stats.log",
    conda:
        "../envs/report.yaml"
    params:
        settings=stats_params(),
    script:
        "../scripts/stats.py"

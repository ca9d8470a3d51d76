# finetune: short recovery training of the pruned model, optionally distilled from the base model.


rule finetune:
    input:
        plan=job_runs("plan.json"),
        weights=job_runs("pruned.safetensors"),
        structure=job_runs("pruned.json"),
        base_weights=f"{BASE}/model.safetensors",
        base_structure=f"{BASE}/model.json",
    output:
        weights=job_runs("finetuned.safetensors"),
        structure=job_runs("finetuned.json"),
        report=job_runs("finetune_report.json"),
    log:
        f"{JOB_LOGS}/finetune.log",
    benchmark:
        f"{BENCH_JOB}/finetune.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        # The model's effective recipe (finetune + models[].finetune, epochs * epochs_scale): a
        # change reruns only that model's fine-tuning chain.
        step=finetune_params,
        seeds=job_seeds,
    script:
        "../scripts/finetune.py"

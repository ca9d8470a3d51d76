# finetune: short recovery training of the pruned model, optionally distilled from the base model.


rule finetune:
    input:
        plan=f"{RUN}/plan.json",
        weights=f"{RUN}/pruned.safetensors",
        structure=f"{RUN}/pruned.json",
        base_weights=f"{BASE}/model.safetensors",
        base_structure=f"{BASE}/model.json",
    output:
        weights=f"{RUN}/finetuned.safetensors",
        structure=f"{RUN}/finetuned.json",
        report=f"{RUN}/finetune_report.json",
    log:
        f"{RUN_LOGS}/finetune.log",
    benchmark:
        f"{BENCH_RUN}/finetune.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        # The model's effective recipe (finetune + models[].finetune, epochs * epochs_scale): a
        # change reruns only that model's fine-tuning chain.
        step=finetune_params,
    script:
        "../scripts/finetune.py"

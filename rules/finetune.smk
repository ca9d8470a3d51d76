# finetune: short recovery training of the pruned model, optionally distilled from the base model.


rule finetune:
    input:
        plan=RUN + "/plan.json",
        weights=RUN + "/pruned.safetensors",
        structure=RUN + "/pruned.json",
        base_weights=BASE + "/model.safetensors",
        base_structure=BASE + "/model.json",
    output:
        weights=RUN + "/finetuned.safetensors",
        structure=RUN + "/finetuned.json",
        report=RUN + "/finetune_report.json",
    params:
        # The model's effective settings (finetune + models[].finetune, epochs * epochs_scale):
        # a change reruns only that model's fine-tuning chain.
        finetune=lambda wc: finetune_settings(config, wc.model),
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/finetune.log",
    benchmark:
        BENCH_RUN + "/finetune.tsv"
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/finetune.py"

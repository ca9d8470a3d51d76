# download: the data set and the base model (pretrained from the hub, or trained from scratch here).


rule download_data:
    output:
        RESULTS + "/{dataset}/dataset.json",
    params:
        dataset=config["dataset"],
    log:
        LOGS + "/{dataset}/download_data.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/download_data.py"


rule download_model:
    input:
        RESULTS + "/{dataset}/dataset.json",
    output:
        weights=BASE + "/model.safetensors",
        structure=BASE + "/model.json",
        metrics=BASE + "/metrics.json",
    params:
        model=lambda wc: model_entry(wc.model),
        training=config["base_training"],
    log:
        LOGS + "/{dataset}/{model}/download_model.log",
    # Between-workflow cache (`snakemake --cache` with $SNAKEMAKE_OUTPUT_CACHE): the base model is
    # keyed by this script, the model entry, the training settings and the data set's provenance, so
    # another study on the same model reuses it instead of downloading or training it again.
    # Snakemake refuses `benchmark:` on a cached rule (a cache hit has nothing to measure); the
    # training time is in base/metrics.json.
    cache: True
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/download_model.py"

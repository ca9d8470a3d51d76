# download: the data set, pretrained weights, and the base model (pretrained, or trained here).
#
# download_data and download_weights are the only jobs that touch the network; both are local
# rules (the login node has the internet, compute nodes may not) and both run before any training,
# so a missing data set or weights file fails the study first.


rule download_data:
    output:
        f"{RESULTS}/{{dataset}}/dataset.json",
    log:
        f"{LOGS}/{{dataset}}/download_data.log",
    conda:
        "../envs/torch.yaml"
    params:
        data=data_params(),
    script:
        "../scripts/download_data.py"


rule download_weights:
    output:
        manifest=f"{RESULTS}/weights/{{model}}.json",
        # A link to the verified file: download_model reads it, and the cluster profile sizes
        # download_model's memory, time and threads from its size.
        weights=f"{RESULTS}/weights/{{model}}.weights",
    log:
        f"{LOGS}/weights/{{model}}.log",
    conda:
        "../envs/torch.yaml"
    params:
        # Which weights file is fetched and how it is checked: a changed `train` or `overrides`
        # retrains the base model but re-fetches nothing.
        weights=weights_params,
    script:
        "../scripts/download_weights.py"


rule download_model:
    input:
        dataset=f"{RESULTS}/{{dataset}}/dataset.json",
        weights=weights_input,
    output:
        weights=f"{BASE}/model.safetensors",
        structure=f"{BASE}/model.json",
        metrics=f"{BASE}/metrics.json",
    log:
        f"{LOGS}/{{dataset}}/{{model}}/download_model.log",
    # Between-workflow cache (`snakemake --cache` with $SNAKEMAKE_OUTPUT_CACHE): the base model is
    # keyed by this script, its params (the model entry, the training settings, the data set) and
    # the data set's provenance, so another study on the same model reuses it instead of training
    # it again. Snakemake refuses `benchmark:` on a cached rule (a cache hit has nothing to
    # measure); the training time is in base/metrics.json.
    cache: True
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        step=base_model_params,
    script:
        "../scripts/download_model.py"

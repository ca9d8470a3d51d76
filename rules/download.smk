# download: the data set, pretrained weights, and the base model (pretrained, or trained here).
#
# download_data and download_weights are the only jobs that touch the network; both are local
# rules (the login node has the internet, compute nodes may not) and both run before any training,
# so a missing data set or weights file fails the study first.


def is_pretrained(name):
    """Whether config.models entry `name` starts from pretrained weights (hub or file)."""
    entry = model_entry(name)
    return bool(entry.get("pretrained") or entry.get("pretrained_file"))


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


# The keys of a models entry that decide which weights file is fetched and how it is checked (a
# params trigger: a changed `train` or `overrides` retrains the base model but re-fetches nothing).
WEIGHTS_KEYS = ("timm", "pretrained", "pretrained_file", "weights_cache", "sha256")


rule download_weights:
    output:
        RESULTS + "/weights/{model}.json",
    params:
        weights=lambda wc: {key: model_entry(wc.model).get(key) for key in WEIGHTS_KEYS},
    log:
        LOGS + "/weights/{model}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/download_weights.py"


rule download_model:
    input:
        dataset=RESULTS + "/{dataset}/dataset.json",
        # Pretrained models read the file that download_weights fetched and verified; models
        # trained from scratch need nothing from the network.
        weights=lambda wc: (
            [RESULTS + f"/weights/{wc.model}.json"] if is_pretrained(wc.model) else []
        ),
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

# profile: MACs breakdown, dependency/isomorphic groups, sensitivity and safety bounds of a base model.


rule profile:
    input:
        weights=BASE + "/model.safetensors",
        structure=BASE + "/model.json",
    output:
        RESULTS + "/{dataset}/{model}/profile.json",
    params:
        profile=config["profile"],
    log:
        LOGS + "/{dataset}/{model}/profile.log",
    # Shared between workflows like the base model it is computed from (see download_model, also
    # for why there is no benchmark: here).
    cache: True
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/profile.py"

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
    benchmark:
        BENCH + "/{dataset}/{model}/profile.tsv"
    threads: 1
    script:
        "../scripts/profile.py"

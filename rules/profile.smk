# profile: MACs breakdown, dependency/isomorphic groups, sensitivity and safety bounds of a base model.


rule profile:
    input:
        weights=f"{BASE}/model.safetensors",
        structure=f"{BASE}/model.json",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/profile.json",
    log:
        f"{LOGS}/{{dataset}}/{{model}}/profile.log",
    # Shared between workflows like the base model it is computed from (see download_model, also
    # for why there is no benchmark: here).
    cache: True
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        step=profile_params,
    script:
        "../scripts/profile.py"

"""agentprune: a reproducible pruning study. See README.md and ../shared/DESIGN.md."""

import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives in workflow/ (installed with `pip install -e .`); make a plain checkout work too.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))


configfile: Path(workflow.basedir) / "config" / "config.yaml"


from agentprune.config import ConfigError, apply_environment, check_config, SCHEMA_PATH

try:
    apply_environment(config)  # e.g. an ImageNet dataset.root left null: $AGENTPRUNE_IMAGENET
    check_config(config)
except ConfigError as err:
    # One line, before any job is scheduled: the message names the offending key.
    print(err, file=sys.stderr)
    raise SystemExit(1) from None
validate(config, str(SCHEMA_PATH))


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/profile.smk"
include: "rules/prune.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/stats.smk"
include: "rules/paper.smk"


rule all:
    input:
        report_outputs(),
    default_target: True


onsuccess:
    render_report(config)

"""agentprune: a reproducible pruning study. See README.md and ../shared/DESIGN.md."""

import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives in workflow/ (installed with `pip install -e .`); make a plain checkout work too.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))


configfile: Path(workflow.basedir) / "config" / "config.yaml"


from agentprune.config import SCHEMA_PATH, ConfigError
from agentprune.resolve import prepare

try:
    # Checked against the schema and the registered methods, the environment's values filled in
    # (an ImageNet dataset.root left null: $AGENTPRUNE_IMAGENET) and every schema default filled
    # in, once: every rule's params are built from this config.
    prepare(config)
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
    default_target: True
    input:
        rules.paper.output,
        report_pages(),


onsuccess:
    render_report(config, list(rules.paper.output) + report_pages())

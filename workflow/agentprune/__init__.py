"""agentprune: a reproducible Snakemake study of neural-network pruning with LLM-agent planning."""

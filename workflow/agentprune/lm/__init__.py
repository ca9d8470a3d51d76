"""The ``lm`` study family: Hugging Face causal LMs pruned layer by layer, scored by perplexity.

Modules (each importable without Snakemake):

* :mod:`~agentprune.lm.settings`: the typed settings objects (torch-free);
* :mod:`~agentprune.lm.models`: where an LM comes from, loading, pickle-free artifacts;
* :mod:`~agentprune.lm.text`: corpora, the calibration/evaluation split, token windows;
* :mod:`~agentprune.lm.evaluate`: token-level perplexity, peak memory, the 2:4 GPU timing;
* :mod:`~agentprune.lm.masks`: per-row and N:M masks, the layer reconstruction error;
* :mod:`~agentprune.lm.calibration`: input norms and Hessians of ``nn.Linear`` layers from hooks;
* :mod:`~agentprune.lm.methods`: magnitude, Wanda and SparseGPT on one ``nn.Linear``;
* :mod:`~agentprune.lm.icbs`: iCBS on one ``nn.Linear`` with the layer-wise objective;
* :mod:`~agentprune.lm.layerwise`: the block-by-block engine (calibration statistics, recomputed
  inputs);
* :mod:`~agentprune.lm.pruning`: one entry point per method for a whole model.
"""

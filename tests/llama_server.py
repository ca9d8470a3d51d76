"""``python tests/llama_server.py ARGS``: llama-cpp-python's OpenAI-compatible server (the same
arguments as ``python -m llama_cpp.server``), with the models loaded as the in-process backend
loads them: without llama.cpp's weight repacking (see ``agentprune.agents.llm``)."""

from __future__ import annotations

from agentprune.agents.llm import weight_repacking_off
from llama_cpp.server.__main__ import main

if __name__ == "__main__":
    with weight_repacking_off():
        main()

"""The CuMo model: config, CLIP(-MoE) vision tower with S2, connector, Mistral / Mixtral LLM."""

"""Launch tools: torchrun recipes, the emulated cluster, the demo."""

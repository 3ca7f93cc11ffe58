"""The SHAPES base recipe: a small LLaDA-V-architecture model trained from scratch on procedural scenes."""

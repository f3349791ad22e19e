"""The run's settings: the model (`spec`), its sources and flags, imported DeepSpeed/accelerate files."""

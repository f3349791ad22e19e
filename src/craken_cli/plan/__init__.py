"""The machine (`hardware`), the spec resolved against it, the memory plan and `--auto`'s choice."""

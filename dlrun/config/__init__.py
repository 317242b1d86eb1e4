"""Finding, composing and validating the Hydra configs in conf/, and what each command supports — without torch."""

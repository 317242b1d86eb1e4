"""Making trained models smaller and faster: quantization (PT2E and torchao) today; pruning and distillation next."""

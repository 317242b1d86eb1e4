"""Deployment: one torch.export path, lowering to .pte / .pt2 / .onnx, the runtimes that run them, parity checks."""

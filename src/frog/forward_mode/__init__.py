"""Forward-mode rules: what lets stock PyTorch layers run under ``torch.func.jvp`` (the lowest layer).

Each module routes a PyTorch function to frog's own for the length of a context (:mod:`.patching`):
scaled dot-product attention (:mod:`.attention`), train-mode batch norm (:mod:`.batchnorm`), fused
kernels without a jvp rule (:mod:`.plain_kernels`) and the same dropout masks in every pass
(:mod:`.masks`). They know nothing of tangents or estimators; the engines (:mod:`frog.engines`) enter
them.
"""

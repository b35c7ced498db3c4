"""Integrations with other libraries. Each submodule imports its library when it is imported itself
(`import faim_kernels` imports none of them), so a user without the library pays nothing:

- `faim_kernels.integrations.pml`: the Randers distance for pytorch-metric-learning's losses,
  miners and accuracy tools (`pip install "faim_kernels[pml]"`).
- `faim_kernels.integrations.timm`: timm models with a FAIMHead, their checkpoints and timm's
  train.py / validate.py (`pip install "faim_kernels[timm]"`).
"""

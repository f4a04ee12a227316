"""adp-fl: adaptive differentially private federated segmentation on NVIDIA FLARE.

Sub-packages ``privacy``, ``tasks``, ``data``, ``training`` and ``evaluation`` are plain
Python/PyTorch and never import ``nvflare``; only ``adpfl.flare`` does.
"""

__version__ = "0.1.0"

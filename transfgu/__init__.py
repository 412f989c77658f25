"""TransFGU: top-down fine-grained unsupervised semantic segmentation (ECCV 2022), rebuilt as a library."""

__version__ = "0.1.0"

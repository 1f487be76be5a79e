"""dpfpl: differentially private, personalised federated prompt learning for CLIP."""

__version__ = "0.1.0"

"""Seeing that the student learns: held-out validation, the k-NN probe, PCA feature maps."""

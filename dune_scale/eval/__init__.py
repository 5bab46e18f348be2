"""Evaluation of trained students: feature visualisations (PCA maps)."""

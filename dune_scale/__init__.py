"""dune_scale: DUNE-style multi-teacher distillation of vision encoders at cluster scale."""

__version__ = "0.1.0"

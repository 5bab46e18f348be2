"""The DUNE student, teacher-feature standardisation, teacher dropping and the losses."""

from dune_scale.distill.losses import fused_distill_loss, reference_distill_loss

__all__ = ["fused_distill_loss", "reference_distill_loss"]

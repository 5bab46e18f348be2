"""Encoders: the DINOv2-style ViT (student, DINOv2/Multi-HMR teachers), CroCo (MASt3R), projector."""

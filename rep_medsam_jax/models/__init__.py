"""Flax (linen) models: RepViT encoder, MedSAM ViT-B teacher, SAM prompt encoder and decoder."""

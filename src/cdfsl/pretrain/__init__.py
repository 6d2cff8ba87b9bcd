"""Pretraining of the embedded tiny CLIP on a procedurally generated, captioned source domain (docs/embedded.md)."""

"""Data: synthetic videos, REAL-Colon/SUN readers, manifests, splits, the MONAI pipeline."""

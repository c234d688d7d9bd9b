"""Data: REAL-Colon/SUN/image-folder readers, manifests, splits, sampling and the MONAI pipeline."""

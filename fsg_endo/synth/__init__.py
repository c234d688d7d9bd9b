"""Procedural colonoscopy videos (colon, polyps of physical size, fisheye camera) written in the REAL-Colon layout."""

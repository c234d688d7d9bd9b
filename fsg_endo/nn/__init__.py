"""The method as torch modules: FSG gates on ViT blocks, Gradient Routing, the sizing ViT models (torch only)."""

"""Data layer: dataset layouts -> manifest, demo data, foreground masks, textures, synthesis, loaders."""

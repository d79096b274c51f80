"""The backup repository: content-addressed chunks in packs, one manifest per backup."""

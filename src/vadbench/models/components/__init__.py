"""Building blocks shared by several models (samplers, layers, flows); a model file imports from here."""

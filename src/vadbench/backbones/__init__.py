"""Backbones: weight sources (random, fractal, imagenet, file) and the frozen timm feature extractor."""

from vadbench.backbones.extractor import FeatureExtractor, build_feature_net, load_feature_extractor
from vadbench.backbones.weights import BackboneCard, materialize_backbone, read_card

__all__ = [
    "BackboneCard",
    "FeatureExtractor",
    "build_feature_net",
    "load_feature_extractor",
    "materialize_backbone",
    "read_card",
]

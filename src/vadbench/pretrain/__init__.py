"""Pretraining of timm backbones on the fractal dataset (classification or SimCLR)."""

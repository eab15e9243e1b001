"""Classification pretraining of timm backbones on the fractal dataset."""

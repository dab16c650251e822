"""Flax models: ViT backbone, Segmenter decoders, MLSeg heads."""

"""MLSeg heads (REFERENCE.md §3-4). Registers its decoders in segmenter.DECODERS."""

"""Image preprocessing: segmentation, stain matching, feature extractors and the feature store."""

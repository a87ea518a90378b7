"""Image preprocessing: segmentation, stain matching, feature extractors and the feature store.

- ``images``: decoding (corrupt files raise naming the file) and the per-image chain.
- ``segmentation``: central-lymphocyte masks, variants by name (``list_variants()``).
- ``stain``: per-channel mean/std transfer (RGB) or Reinhard (Lab) to a named reference set.
- ``autoencoder`` / ``backbones``: the two kinds of feature extractor.
- ``pretrain``: folder-per-class fine-tuning whose weights file serves as a backbone.
- ``store`` / ``extract``: ``extract_features(cohort, config, cache_dir)`` → ``FeatureStore``.
- ``transforms``: ``BagTransform`` (scaler + PCA fitted on training bags only).
- ``commands``: the functions behind ``milbench segment``, ``features`` and ``pretrain``.

Never imports ``milbench.models``.
"""

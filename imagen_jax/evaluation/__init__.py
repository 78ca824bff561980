"""Evaluation: FID Inception-v3, Fréchet distance, COCO 2014 protocol, feature shards.

  inception  FID Inception-v3 in Flax (pytorch-fid parity), weights reader
  fid        frechet_distance, statistics, .npz statistics files
  coco       COCO val2014 captions / reference images / reference statistics
  features   FeatureStore: sharded, resumable [N, 2048] feature files

Submodules are imported on use; none imports TensorFlow at import time.
"""

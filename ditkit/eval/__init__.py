"""Evaluation: ditkit's own MNIST classifier, FID in its feature space, and metrics with intervals.

Read `FID_NOTE` before comparing numbers: this FID uses an MNIST classifier's features, not
Inception's, so its values compare within ditkit only.
"""

from .classifier import (
    CLASSIFIER_SHA256,
    FEATURE_DIM,
    ImageInputError,
    MnistClassifier,
    check_images,
    classify,
    default_classifier,
    features,
    labels_from_features,
    load_classifier,
    train_classifier,
    weights_sha256,
)
from .fid import FID_NOTE, FrechetDistanceError, feature_stats, fid_from_images, frechet_distance, reference_stats
from .metrics import bootstrap_ci, class_accuracy, evaluate_images, fid_with_ci, real_data_floor, wilson_interval

__all__ = [
    "CLASSIFIER_SHA256",
    "FEATURE_DIM",
    "FID_NOTE",
    "FrechetDistanceError",
    "ImageInputError",
    "MnistClassifier",
    "bootstrap_ci",
    "check_images",
    "class_accuracy",
    "classify",
    "default_classifier",
    "evaluate_images",
    "feature_stats",
    "features",
    "fid_from_images",
    "fid_with_ci",
    "frechet_distance",
    "labels_from_features",
    "load_classifier",
    "real_data_floor",
    "reference_stats",
    "train_classifier",
    "weights_sha256",
]

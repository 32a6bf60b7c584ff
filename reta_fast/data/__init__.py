"""Data sets: ImageFolders read without torchvision (:mod:`.folder`), images held as tensors and the
embedded digits (:mod:`.tensors`), and the ``--data`` resolver with batch iteration (:mod:`.sets`)."""
from .folder import ImageFolder, dataset_classes, dataset_targets, to_image_tensor
from .sets import DataSpec, SizedImages, iterate_batches, load_data, materialize, random_real_images
from .tensors import TensorImageDataset, digits_dataset, normalise_pixels

__all__ = ["DataSpec", "ImageFolder", "SizedImages", "TensorImageDataset", "dataset_classes", "dataset_targets",
           "digits_dataset", "iterate_batches", "load_data", "materialize", "normalise_pixels",
           "random_real_images", "to_image_tensor"]

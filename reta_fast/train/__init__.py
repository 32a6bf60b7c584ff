"""Training: classifiers (the teacher, :mod:`.classifier`), the student protocol of docs/method.md §5
(:mod:`.student`), and stored soft labels on disk (:mod:`.labels`)."""
from ..data.tensors import TensorImageDataset, digits_dataset, normalise_pixels
from .classifier import accuracy, dist_world, train_classifier
from .student import relabel, relabel_batches, student_batches, train_student

__all__ = ["TensorImageDataset", "accuracy", "digits_dataset", "dist_world", "normalise_pixels", "relabel",
           "relabel_batches", "student_batches", "train_classifier", "train_student"]

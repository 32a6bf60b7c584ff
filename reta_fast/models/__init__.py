"""Networks: the architectures reta_fast trains (:mod:`.nets`, by name through :mod:`.arch`), what the
pipeline reads off a teacher (:mod:`.features`), and teacher checkpoints (:mod:`.teachers`)."""
from .arch import build_arch, default_arch
from .features import feature_head, named_feature_head, set_feature_head, teacher_features, teacher_fingerprint
from .nets import ConvNetBN, ResNet18, convnet_bn, resnet18
from .teachers import Teacher, load_teacher, save_teacher

__all__ = ["ConvNetBN", "ResNet18", "Teacher", "build_arch", "convnet_bn", "default_arch", "feature_head",
           "load_teacher", "named_feature_head", "resnet18", "save_teacher", "set_feature_head", "teacher_features", "teacher_fingerprint"]

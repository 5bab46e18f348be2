"""The pixel statistics every model here takes its inputs in: the student and all teachers see
ImageNet-normalised images (MASt3R converts to its own 0.5/0.5 inside)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

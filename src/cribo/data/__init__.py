"""Datasets: image folders for pretraining, segmentation sets, synthetic scenes (one module each)."""

from cribo.data.folder import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from cribo.data.folder import ImageFolder as ImageFolder
from cribo.data.folder import list_images as list_images
from cribo.data.folder import load_rgb as load_rgb
from cribo.data.folder import to_rgb as to_rgb
from cribo.data.scenes import SyntheticScenes as SyntheticScenes

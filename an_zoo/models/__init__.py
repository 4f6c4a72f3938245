"""The an_* model families; importing them registers every architecture with timm."""
from .aognet import *
from .densenet import *
from .mobilenet import *
from .resnet import *

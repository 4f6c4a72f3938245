from .mobilenet import *
from .resnet import *

from .aognet import *
from .densenet import *
from .mobilenet import *
from .resnet import *

"""an_zoo: Attentive Normalization (arXiv:1908.01259) models for timm.

``import an_zoo`` registers every ``an_*`` architecture with timm's model registry.
"""
__version__ = '0.1.0'

from .layers import (
    AttentiveBatchNorm2d, AttentiveBatchNormAct2d, AttentiveGroupNorm, attentive_norm_no_weight_decay,
    convert_bn_to_an, convert_sync_batchnorm, freeze_batch_norm_2d, set_an_impl)
from .models import *  # noqa: F401,F403  (registers the models with timm)
from .licenses import LicenseNotAcceptedError, accept_license, accepted_licenses
from .models._checkpoint import CheckpointError, load_checkpoint_file

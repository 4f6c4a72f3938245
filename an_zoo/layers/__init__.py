"""The Attentive Normalization layers (reference and fast paths, AN over GroupNorm) and AN-aware norm utilities."""
from .attentive_norm import (
    ATTENTION_EPS, AttentiveBatchNorm2d, AttentiveBatchNormAct2d, MixtureAttention, instance_attention_stats)
from .attentive_group_norm import AttentiveGroupNorm, GroupMixtureAttention
from .functional import attentive_batch_norm
from .mixture import MixtureNorm
from .norm_utils import (
    attentive_norm_no_weight_decay, convert_bn_to_an, convert_sync_batchnorm, freeze_batch_norm_2d, set_an_impl)
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

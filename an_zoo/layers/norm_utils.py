"""AN-aware versions of the BatchNorm utilities timm and torch provide (sync-BN, freezing, weight decay)."""
from typing import Optional, Set

import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d as timm_freeze_batch_norm_2d

from .attentive_norm import AttentiveBatchNorm2d

__all__ = ['FrozenAttentiveBatchNorm2d', 'freeze_batch_norm_2d', 'convert_sync_batchnorm',
           'attentive_norm_no_weight_decay']


class FrozenAttentiveBatchNorm2d(AttentiveBatchNorm2d):
    """AN with frozen running statistics, mixture and attention BatchNorm; the attention itself is still computed
    per instance. The AN counterpart of ``FrozenBatchNorm2d`` for small-batch fine-tuning (e.g. detection).

    Same state_dict as :class:`AttentiveBatchNorm2d`; the frozen parameters have ``requires_grad=False`` and its
    BatchNorms stay in eval mode whatever ``train()`` is called with. Only ``attn.conv`` remains trainable.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in (self.mixture_weight, self.mixture_bias, *self.attn.bn.parameters()):
            param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> 'FrozenAttentiveBatchNorm2d':
        super().train(mode)
        self.norm.eval()
        self.attn.bn.eval()
        return self

    @classmethod
    def from_module(cls, module: AttentiveBatchNorm2d) -> 'FrozenAttentiveBatchNorm2d':
        ref = module.mixture_weight
        frozen = cls(module.num_features, module.num_mixtures, eps=module.eps, momentum=module.momentum,
                     attn_eps=module.attn.eps, device=ref.device, dtype=ref.dtype)
        frozen.load_state_dict(module.state_dict())
        frozen.train(module.training)
        return frozen


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """Freeze every norm of ``module``: AN layers become :class:`FrozenAttentiveBatchNorm2d`, plain BatchNorm
    timm's ``FrozenBatchNorm2d``. timm's own ``freeze_batch_norm_2d`` alone would freeze an AN layer's inner
    statistics but leave its mixture trainable. Returns the (possibly new) module, as timm's does."""
    if isinstance(module, AttentiveBatchNorm2d):
        return module if isinstance(module, FrozenAttentiveBatchNorm2d) else FrozenAttentiveBatchNorm2d.from_module(module)
    frozen = timm_freeze_batch_norm_2d(module) if not any(
        isinstance(m, AttentiveBatchNorm2d) for m in module.modules()) else module
    if frozen is module:
        for name, child in module.named_children():
            new_child = freeze_batch_norm_2d(child)
            if new_child is not child:
                module.add_module(name, new_child)
    return frozen


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """torch's ``SyncBatchNorm.convert_sync_batchnorm``, which is AN-aware as is: an AN layer's standardization and
    attention BatchNorm are ordinary BatchNorm children, so both are synchronised and the attention and mixture
    are kept. Exposed so that users have one import for it; tested in ``tests/test_norm_utils.py``."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


def attentive_norm_no_weight_decay(model: nn.Module) -> Set[str]:
    """Names of the AN mixture parameters, exempt from weight decay.

    timm's optimizer factory exempts 1-d parameters and biases only, so the (K, C) ``mixture_weight`` would be
    decayed. The reference training script's norm-exempt mode (``--remove-norm-weight-decay``) exempts every
    parameter owned by a norm module, the mixture included; the attention's 1x1 conv stays decayed.
    """
    return {f'{name}.{param}' for name, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)
            for param in ('mixture_weight', 'mixture_bias')}

"""Small helpers shared by test modules (the tests folder is on sys.path, as for hf_server)."""
import torch


def calibrated(model, x):
    """``model`` in eval mode with running statistics set from ``x`` (at init they are 0/1, and a deep random net in
    eval mode then amplifies float rounding differences layer after layer)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval()

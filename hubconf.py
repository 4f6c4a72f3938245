"""torch.hub entry points: every an_* model registered by an_zoo.

    torch.hub.load('<owner>/an_zoo:<tag>', 'an_resnet50', pretrained=False, trust_repo=True)
    torch.hub.load('/path/to/an_zoo', 'an_resnet50', source='local')

Each entry point is the timm entrypoint itself (same signature, ``pretrained`` and ``**kwargs``), generated from
timm's registry, so the list can never drift from the package. Imports the an_zoo next to this file, so a hub
checkout always runs its own code.
"""
import os
import sys

dependencies = ['torch', 'torchvision', 'timm', 'huggingface_hub', 'safetensors']

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import an_zoo  # noqa: E402  (registers the models)
finally:
    sys.path.pop(0)
import timm  # noqa: E402

globals().update({name: timm.models.model_entrypoint(name) for name in timm.list_models('an_*')})

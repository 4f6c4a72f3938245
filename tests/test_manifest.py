"""weights_manifest.json holds every official AN weight, with the numbers exactly as the release publishes them."""
import re
from decimal import Decimal

import pytest
import timm

import an_zoo  # noqa: F401  (registers the an_* models)
from an_zoo._manifest import load_manifest, weight_entry
from an_zoo.eval_sets import EVAL_SETS

# every AN weight file of the two official releases: the AOGNet-v2 README tables (one Google Drive link each) and
# the AN rows of iVMCL-Release docs/classification.md (one shared Drive folder)
OFFICIAL = {
    # AOGNet-v2 README name -> an_zoo weight
    'ResNet-50-AN (w/ BN)': 'an_resnet50.aog_e120_in1k',
    'ResNet-101-AN (w/ BN)': 'an_resnet101.aog_e120_in1k',
    'MobileNet-v2-AN (w/ BN)': 'an_mobilenetv2_100.aog_e150_in1k',
    'AOGNet-12M-AN (w/ BN)': 'an_aognet_12m.aog_e120_in1k',
    'AOGNet-40M-AN (w/ BN)': 'an_aognet_40m.aog_e120_in1k',
    'ResNet-50-AN (w/ BN), advanced setup': 'an_resnet50d.aog_e200_lsmix_in1k',
    'ResNet-101-AN (w/ BN), advanced setup': 'an_resnet101d.aog_e200_lsmix_in1k',
    'AOGNet-12M-AN (w/ BN), advanced setup': 'an_aognet_12m.aog_e200_lsmix_in1k',
    'AOGNet-40M-AN (w/ BN), advanced setup': 'an_aognet_40m.aog_e200_lsmix_in1k',
    # iVMCL-Release row -> an_zoo weight
    'aognet_12m_an_imagenet': 'an_aognet_12m.ivmcl_e120_in1k',
    'aognet_40m_an_imagenet': 'an_aognet_40m.ivmcl_e120_in1k',
    'resnet_34_an_bn1_imagenet': 'an_resnet34_bn1.ivmcl_e120_in1k',
    'resnet_34_an_bn12_imagenet': 'an_resnet34_bn12.ivmcl_e120_in1k',
    'resnet_50_an_bn2_imagenet': 'an_resnet50.ivmcl_e120_in1k',
    'resnet_50_an_bn3_imagenet': 'an_resnet50_bn3.ivmcl_e120_in1k',
    'resnet_50_an_all_imagenet': 'an_resnet50_all.ivmcl_e120_in1k',
    'resnet_101_an_imagenet': 'an_resnet101.ivmcl_e120_in1k',
    'mobilenetv2_an_imagenet': 'an_mobilenetv2_100.ivmcl_e150_in1k',
    'densenet_121_an_imagenet': 'an_densenet121.ivmcl_e120_in1k',
    'aognet_12m_an_imagenet_200e_ls_mixup': 'an_aognet_12m.ivmcl_e200_lsmix_in1k',
    'aognet_40m_an_imagenet_200e_ls_mixup': 'an_aognet_40m.ivmcl_e200_lsmix_in1k',
    'resnetv1d_50_an_imagenet_200e_ls_mixup': 'an_resnet50d.ivmcl_e200_lsmix_in1k',
    'resnetv1d_101_an_imagenet_200e_ls_mixup': 'an_resnet101d.ivmcl_e200_lsmix_in1k',
}
ENTRIES = load_manifest()


def test_every_official_weight_has_one_entry():
    assert {e.provenance['official_name']: e.name for e in ENTRIES} == OFFICIAL
    for entry in ENTRIES:
        assert entry.provenance['official_url'].startswith('https://drive.google.com/')
        assert entry.license['terms'] == 'research and non-commercial use only'


@pytest.mark.parametrize('entry', ENTRIES, ids=[e.name for e in ENTRIES])
def test_reported_numbers_are_the_published_ones(entry):
    """Each percentage is the published figure converted exactly: accuracy fractions x 100 (iVMCL-Release), or
    100 - error % (AOGNet-v2)."""
    results = entry.reported['results']
    assert results.get('imagenet-1k', {}).get('top1') is not None
    for eval_set, metrics in results.items():
        published = metrics['as_published']
        fractions = re.fullmatch(r'\((0\.\d+), (0\.\d+)\)', published)
        errors = re.fullmatch(r'top-1 error ([\d.]+) %, top-5 error ([\d.]+) %', published)
        assert fractions or errors, published
        if fractions:
            expected = [float(Decimal(v) * 100) for v in fractions.groups()]
        else:
            expected = [float(100 - Decimal(v)) for v in errors.groups()]
        assert [metrics['top1'], metrics['top5']] == expected, f'{eval_set}: {published}'
    if entry.license['name'].startswith('iVMCL'):
        assert list(results) == list(EVAL_SETS)  # all eight columns of the release's table, in its order


def test_default_tag_is_the_most_accurate_weight():
    for arch in {a for e in ENTRIES for a in e.architectures}:
        entries = [e for e in ENTRIES if arch in e.architectures]
        best = max(entries, key=lambda e: e.reported_result())
        assert timm.get_pretrained_cfg(arch).tag == best.tag, arch
    assert timm.get_pretrained_cfg('an_aognet_40m').tag == 'aog_e200_lsmix_in1k'  # 81.87 %, the best AN model


def test_every_entry_is_a_registered_timm_tag():
    tags = set(timm.list_models('an_*', include_tags=True))
    for entry in ENTRIES:
        for arch in entry.architectures:
            assert f'{arch}.{entry.tag}' in tags
            assert weight_entry(f'{arch}.{entry.tag}') is entry

"""python -m an_zoo.demo for model families whose classifier is named differently (ResNet ``fc``, MobileNet
``classifier`` with a ``conv_head`` after the last feature stage)."""
import pytest

from an_zoo import demo

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('model', ['an_resnet18_bn1', 'an_mobilenetv2_050'])
def test_demo_classifies_and_extracts_features(model, capsys, monkeypatch):
    import sklearn  # noqa: F401  (test extra: its absence is a failure, not a skip)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    demo.main(['--model', model])
    out = capsys.readouterr().out
    assert 'china.jpg (640x427)' in out and 'flower.jpg' in out
    assert 'features_only pyramid: ' in out

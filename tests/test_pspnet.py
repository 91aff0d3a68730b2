"""Tests for models.pspnet (the dilated PSPNet of SKD/IFVD/CIRKD) and models.WithFeatures."""

import copy
import time

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from minikd import models
from minikd.models import (
    WithFeatures,
    build_segmenter,
    count_parameters,
    param_groups,
    pspnet,
    unet_family,
)

torch.set_num_threads(1)
X = torch.rand(2, 3, 64, 64)


@pytest.fixture(scope="module")
def psp18():
    torch.manual_seed(0)
    return pspnet("resnet18", 5).eval()


def _convs(module: nn.Module, kernel: int) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] == kernel]


# --------------------------------------------------------------------------- architecture
def test_output_stride_8_features_and_logits(psp18):
    assert psp18.name == "PSPNet-resnet18-d8" and psp18.output_stride == 8
    with torch.no_grad():
        features, logits = psp18.forward_features(X), psp18(X)
    assert features.shape == (2, 128, 8, 8)  # SKD's ResNet18 width: 512 / 4 fused channels
    assert logits.shape == (2, 5, 64, 64)
    wide = pspnet("resnet18", 5, psp_out_channels=512).eval()  # the width SKD's teacher has
    with torch.no_grad():
        assert wide.forward_features(X).shape == (2, 512, 8, 8)
        assert wide(X).shape == (2, 5, 64, 64)


def test_train_mode_accepts_batch_of_one(psp18):
    model = copy.deepcopy(psp18).train()  # the 1x1 bin has no BN (smp), so B = 1 trains
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_layer3_and_layer4_are_dilated_not_strided(psp18):
    enc = psp18.encoder
    for layer, dilation in ((enc.layer3, 2), (enc.layer4, 4)):
        assert all(c.stride == (1, 1) for c in _convs(layer, 1) + _convs(layer, 3))
        assert all(c.dilation == (dilation, dilation) and c.padding == (dilation, dilation)
                   for c in _convs(layer, 3))
    assert enc.layer2[0].conv1.stride == (2, 2) and enc.layer2[0].conv1.dilation == (1, 1)
    assert psp18.decoder.fuse[0].kernel_size == (3, 3)  # PSPNet's 3x3 fusion conv
    assert psp18.decoder.dropout.p == 0.1


def test_output_stride_16_dilates_only_layer4():
    model = pspnet("resnet18", 5, output_stride=16).eval()
    assert model.name == "PSPNet-resnet18-d16"
    assert model.encoder.layer3[0].conv1.stride == (2, 2)
    assert {c.dilation for c in _convs(model.encoder.layer4, 3)} == {(2, 2)}
    with torch.no_grad():
        assert model.forward_features(X).shape == (2, 128, 4, 4)
        assert model(X).shape == (2, 5, 64, 64)


def test_smp_default_pspnet_truncates_instead_of_dilating(psp18):
    """smp's PSPNet gets output stride 8 by cutting the encoder after layer2 (encoder_depth=3)."""
    smp_psp = build_segmenter("PSPNet", "resnet18", 5)
    assert smp_psp.output_stride == 8 and smp_psp.encoder._depth == 3
    assert {c.dilation for c in _convs(smp_psp.encoder, 3)} == {(1, 1)}  # no dilation anywhere
    assert smp_psp.encoder.layer3[0].conv1.stride == (2, 2)  # layer3/4 kept but never run
    assert smp_psp.decoder.psp.blocks[0].pool[1][0].in_channels == 128  # PPM on layer2
    assert smp_psp.decoder.conv[0].kernel_size == (1, 1)  # 1x1 fusion, dropout 0.2
    assert psp18.decoder.psp.blocks[0].pool[1][0].in_channels == 512  # PPM on layer4 (SKD)


# --------------------------------------------------------------------------- parameter counts
def test_parameter_counts_resnet18_and_resnet101():
    """R18: 12,621,907 here; SKD's network adds a deep stem, a BN on the 1x1 bin and the DSN head."""
    model = pspnet("resnet18", 19)
    n = count_parameters(model)
    print(f"PSPNet-R18-d8, 19 classes: {n:,} parameters")
    resnet18_without_fc = 11_176_512
    ppm = 4 * 512 * 128 + 128 + 3 * 2 * 128  # 1x1 convs; bin 1 has a bias, bins 2, 3, 6 a BN
    fuse = 1024 * 128 * 9 + 2 * 128  # 3x3 conv on [layer4, 4 bins] + BN
    classifier = 128 * 19 + 19
    assert count_parameters(model.encoder) == resnet18_without_fc
    assert n == resnet18_without_fc + ppm + fuse + classifier == 12_621_907
    skd = n + 128 + 148_480 + 297_747  # BN on bin 1, deep stem, DSN auxiliary head
    cirkd = n + 128 + 148_480 + 148_819  # CIRKD: deep stem, FCN auxiliary head
    assert 12.9e6 <= cirkd < skd <= 13.1e6  # the 12.9-13.1 M reported for PSPNet-R18
    with torch.device("meta"):  # no memory, no initialisation cost
        teacher = pspnet("resnet101", 19)
    print(f"PSPNet-R101-d8, 19 classes: {count_parameters(teacher):,} parameters")
    assert count_parameters(teacher) == 65_583_187
    assert teacher.decoder.fuse[0].out_channels == 512  # SKD's teacher width


def test_zoo_can_name_pspnet():
    with torch.device("meta"):
        model = models.build_from_entry({"builder": "pspnet",
                                         "args": {"encoder": "resnet18", "num_classes": 3}})
    assert model.name == "PSPNet-resnet18-d8"


# --------------------------------------------------------------------------- WithFeatures
@pytest.mark.parametrize("which", ["pspnet", "unet", "segformer"])
def test_with_features_logits_equal_model_in_one_pass(which, psp18):
    torch.manual_seed(0)
    model = {"pspnet": lambda: psp18, "unet": lambda: unet_family("M128/4", 5).eval(),
             "segformer": lambda: models.SegFormer("mit_b0/2", 5).eval()}[which]()
    wrapped = WithFeatures(model)
    with torch.no_grad():
        out = wrapped(X)
        expected = model(X)
    assert set(out) == {"logits", "features"}
    assert torch.equal(out["logits"], expected)
    size = {"pspnet": 8, "unet": 64, "segformer": 16}[which]  # 1/8, full resolution, 1/4
    assert out["features"].shape[-2:] == (size, size)
    assert wrapped.output_stride == model.output_stride


def test_with_features_matches_model_in_train_mode_with_same_seed(psp18):
    model = copy.deepcopy(psp18).train()
    torch.manual_seed(1)
    out = WithFeatures(model)(X)
    torch.manual_seed(1)
    assert torch.equal(out["logits"], model(X))  # same dropout draws: one pass, same head


def test_param_groups_through_wrapper_equal_unwrapped(psp18):
    wrapped = WithFeatures(psp18)
    enc, dec = param_groups(wrapped)
    enc0, dec0 = param_groups(psp18)
    assert [id(p) for p in enc] == [id(p) for p in enc0]
    assert [id(p) for p in dec] == [id(p) for p in dec0]
    assert [id(p) for p in wrapped.encoder_parameters()] == [id(p) for p in enc0]
    assert [id(p) for p in wrapped.decoder_parameters()] == [id(p) for p in dec0]
    assert len(enc) > 0 and len(dec) > 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"encoder": "mobilenet_v2"}, r"ResNet encoder.*got 'mobilenet_v2'.*build_segmenter"),
    ({"encoder": "tu-resnet18"}, r"one of \['resnet18'.*got 'tu-resnet18'"),
    ({"output_stride": 4}, r"output_stride 8 \(SKD\), 16 or 32; got 4"),
    ({"output_stride": 8.0}, r"output_stride 8 \(SKD\), 16 or 32; got 8.0"),
    ({"num_classes": 0}, r"num_classes, a positive int.*got 0"),
    ({"psp_out_channels": 0}, r"psp_out_channels must be a positive int.*128 for resnet18.*got 0"),
])
def test_bad_arguments_raise_helpful_value_error(kwargs, match):
    args = {"encoder": "resnet18", "num_classes": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        pspnet(**args)


def test_input_not_multiple_of_8_is_rejected(psp18):
    with pytest.raises(ValueError, match=r"PSPNet-resnet18-d8.*output stride 8.*H in \[56, 64\]"):
        psp18(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="output stride 8"):
        WithFeatures(psp18)(torch.rand(1, 3, 60, 64))


def test_with_features_rejects_models_without_forward_features():
    with pytest.raises(ValueError, match=r"forward_features.*Conv2d lacks \['forward_features', "
                                         r"'segmentation_head'\]"):
        WithFeatures(nn.Conv2d(3, 5, 1))


# --------------------------------------------------------------------------- weights
def test_pretrained_offline_fails_fast_with_help(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="could not be fetched") as err:
        pspnet("resnet18", 5, pretrained=True)
    assert time.perf_counter() - start < 5.0
    assert "pretrained=False" in str(err.value) and "weights_path=" in str(err.value)


def test_plain_resnet_weights_load_into_the_dilated_encoder(tmp_path, psp18):
    """ImageNet ResNet weights fit: dilation changes strides and padding, not weight shapes."""
    plain = smp.encoders.get_encoder("resnet18", weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(plain.state_dict(), path)
    model = pspnet("resnet18", 5, weights_path=path)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)

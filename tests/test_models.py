"""Tests for minikd.models: shapes, input validation, offline weights, DUDES head, param groups."""

import copy
import socket
import time

import huggingface_hub.constants
import pytest
import segmentation_models_pytorch as smp
import torch
from torch.func import functional_call

from minikd import models
from minikd.models import (
    SUPPORTED_ENCODERS,
    DepthFormer,
    DUDESStudent,
    SegDepthFormer,
    SegFormer,
    UNet,
    as_dict,
    build_segmenter,
    count_parameters,
    param_groups,
    unet_family,
)

torch.set_num_threads(1)
X = torch.rand(2, 3, 64, 64)

# one cheap encoder per architecture; stride each needs
ARCHS = {
    "Unet": ("mobilenet_v2", 32),
    "DeepLabV3Plus": ("resnet18", 16),
    "PSPNet": ("mobilenet_v2", 8),
    "Segformer": ("mit_b0", 32),
}


@pytest.fixture(scope="module")
def segmenters():
    torch.manual_seed(0)
    return {a: build_segmenter(a, enc, 5).eval() for a, (enc, _) in ARCHS.items()}


@pytest.fixture(scope="module")
def all_models(segmenters):
    """One instance of every model class (tiny sizes), in eval mode."""
    torch.manual_seed(0)
    found = {f"smp-{a}": m for a, m in segmenters.items()}
    found["UNet-tiny"] = unet_family("M128/4", 4)
    found["DUDES-dlv3"] = DUDESStudent(build_segmenter("DeepLabV3Plus", "resnet18", 5))
    found["DUDES-unet"] = DUDESStudent(unet_family("M128/4", 4))
    found["SegFormer"] = SegFormer("mit_b0", 4)
    found["DepthFormer"] = DepthFormer("mit_b0")
    found["SegDepthFormer"] = SegDepthFormer("mit_b0", num_classes=4)
    return {k: m.eval() for k, m in found.items()}


# --------------------------------------------------------------------------- build_segmenter
@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_arch_builds_and_keeps_shape(segmenters, arch):
    model = segmenters[arch]
    assert model.output_stride == ARCHS[arch][1]
    with torch.no_grad():
        out = model(X)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 64, 64)


@pytest.mark.parametrize("arch, encoder", [("Unet", "efficientnet-b0"), ("Unet", "resnet18")])
def test_more_encoders_build(arch, encoder):
    with torch.no_grad():
        out = build_segmenter(arch, encoder, 3).eval()(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)


def test_every_supported_encoder_name_is_known_to_smp():
    # building mit_b5/resnet101/vgg16 is slow; the names are checked instead
    names = set(smp.encoders.get_encoder_names())
    assert set(SUPPORTED_ENCODERS) <= names
    for name in SUPPORTED_ENCODERS:
        models._check_encoder(name)


def test_state_dict_keys_are_smps():
    ours = build_segmenter("Unet", "mobilenet_v2", 3)
    theirs = smp.Unet("mobilenet_v2", encoder_weights=None, classes=3)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_arch_aliases():
    assert build_segmenter("deeplabv3+", "mobilenet_v2", 2).output_stride == 16


def test_unknown_arch_and_encoder_say_what_is_supported():
    with pytest.raises(ValueError, match="unknown arch 'FCN'.*Unet, DeepLabV3Plus, PSPNet"):
        build_segmenter("FCN", "resnet18", 3)
    with pytest.raises(ValueError, match="unknown encoder 'resnet-18'.*mit_b0.*'resnet18'"):
        build_segmenter("Unet", "resnet-18", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_segmenter("Unet", "resnet18", 0)


def test_deeplab_with_vgg_is_rejected_with_reason():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="dilated.*resnet18"):
        build_segmenter("DeepLabV3Plus", "vgg16", 3)
    assert time.perf_counter() - start < 1.0


def test_deeplab_train_mode_batch_one_gives_clear_error(segmenters):
    model = copy.deepcopy(segmenters["DeepLabV3Plus"]).train()
    with pytest.raises(ValueError, match="batch of at least 2.*model.eval"):
        model(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5, 64, 64)


# --------------------------------------------------------------------------- pretrained weights
def test_pretrained_offline_fails_fast_with_help(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="could not be fetched") as err:
        build_segmenter("Unet", "mobilenet_v2", 3, pretrained=True)
    assert time.perf_counter() - start < 5.0
    assert "pretrained=False" in str(err.value) and "weights_path=" in str(err.value)


def test_pretrained_without_offline_flag_fails_fast_when_unreachable(empty_hub_cache,
                                                                      monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not answer.*pretrained=False"):
        SegFormer("mit_b0", 3, pretrained=True)
    assert time.perf_counter() - start < 5.0


def test_hub_probe_returns_false_fast_on_closed_port():
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    assert models._hub_reachable(f"http://127.0.0.1:{port}", timeout=1.0) is False
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_path_loads_a_local_encoder(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_segmenter("Unet", "mobilenet_v2", 3)
    path = tmp_path / f"enc{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.encoder.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)  # whole model: "encoder." keys are picked
    torch.manual_seed(2)
    loaded = build_segmenter("PSPNet", "mobilenet_v2", 3, weights_path=path)
    for key, value in loaded.encoder.state_dict().items():
        torch.testing.assert_close(value, source.encoder.state_dict()[key])


# --------------------------------------------------------------------------- input validation
BAD_INPUTS = {
    "3-D": (torch.rand(3, 64, 64), r"4-D batch.*\(3, 64, 64\).*unsqueeze"),
    "1 channel": (torch.rand(1, 1, 64, 64), r"3 channels.*\(1, 1, 64, 64\)"),
    "int dtype": (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"floating.*torch.uint8"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("name", ["smp-Unet", "UNet-tiny", "DUDES-dlv3", "SegDepthFormer"])
def test_bad_inputs_raise_value_error(all_models, name, bad):
    x, message = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=message):
        all_models[name](x)


def test_not_a_tensor_raises_type_error(all_models):
    with pytest.raises(TypeError, match="torch.Tensor"):
        all_models["UNet-tiny"](torch.rand(1, 3, 32, 32).numpy())


@pytest.mark.parametrize("name", ["smp-Unet", "smp-Segformer", "DUDES-dlv3", "SegFormer",
                                  "DepthFormer", "SegDepthFormer"])
def test_size_not_divisible_names_shape_and_sizes_that_fit(all_models, name):
    stride = all_models[name].output_stride
    expected = {32: r"H in \[32, 64\], W in \[64\]", 16: r"H in \[48, 64\], W in \[64\]"}[stride]
    with pytest.raises(ValueError, match=rf"\(1, 3, 63, 64\).*{expected}"):
        all_models[name](torch.rand(1, 3, 63, 64))


def test_unet_size_message_uses_its_stride(all_models):
    with pytest.raises(ValueError, match=r"stride 8.*H in \[56, 64\]"):
        all_models["UNet-tiny"](torch.rand(1, 3, 63, 64))


# --------------------------------------------------------------------------- UNet family
def test_unet_shapes_and_filter_progression():
    net = unet_family("M128", 6)
    assert net.output_stride == 8
    assert [block[0].out_channels for block in net.encoder] == [16, 32, 64]
    assert net.bridge[0].out_channels == 128
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 32, 64)).shape == (1, 6, 32, 64)


def test_unet_family_param_counts_increase():
    counts = [count_parameters(unet_family(n, 6)) for n in ("M128/4", "M128", "M256", "M512",
                                                             "M1024")]
    assert counts == sorted(counts) and len(set(counts)) == 5
    assert counts == [30_566, 482_822, 1_942_662, 7_778_694, 31_116_166]  # docstring table
    assert 10_000 < counts[0] < 100_000
    assert count_parameters(unet_family("M1024/4", 6)) == 1_947_334  # docstring table


def test_unet_without_batchnorm_has_conv_biases_only():
    net = unet_family("M1024*", 6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net.output_stride == 64


def test_unet_rejects_bad_presets_and_shapes():
    with pytest.raises(ValueError, match="M2048.*M1024.*/d"):
        unet_family("M2048", 3)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth=8"):
        UNet(3, 100, num_classes=3)


# --------------------------------------------------------------------------- DUDES student
def test_dudes_head_adds_257_parameters_to_deeplabv3plus_resnet18():
    baseline = build_segmenter("DeepLabV3Plus", "resnet18", 19)
    assert count_parameters(baseline) == 12_333_923  # DUDES Table 3, "Baseline"
    student = DUDESStudent(baseline)
    assert count_parameters(student) - count_parameters(baseline) == 257


@pytest.mark.parametrize("name", ["DUDES-dlv3", "DUDES-unet"])
def test_dudes_outputs(all_models, name):
    with torch.no_grad():
        out = all_models[name](X)
    assert set(out) == {"logits", "uncertainty"}
    assert out["uncertainty"].shape == (2, 64, 64)
    assert out["logits"].shape[-2:] == (64, 64)
    assert out["uncertainty"].min() >= 0 and out["uncertainty"].max() <= 1


def test_dudes_accepts_raw_smp_model_and_segformer():
    raw = smp.Unet("mobilenet_v2", encoder_weights=None, classes=3)
    student = DUDESStudent(raw)
    assert count_parameters(student) - count_parameters(raw) == 16 * 9 + 1  # 3x3 conv, 16 ch
    seg = DUDESStudent(SegFormer("mit_b0", 3)).eval()
    with torch.no_grad():
        out = seg(torch.rand(1, 3, 32, 64))
    assert out["logits"].shape == (1, 3, 32, 64) and out["uncertainty"].shape == (1, 32, 64)


def test_dudes_shares_the_decoder():
    unet = unet_family("M128/4", 3)
    student = DUDESStudent(unet)
    assert student.segmenter is unet
    assert count_parameters(student) - count_parameters(unet) == 4 + 1  # 1x1 conv on 4 ch


# --------------------------------------------------------------------------- EMUFormer models
def test_formers_outputs(all_models):
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        seg = all_models["SegFormer"](x)
        depth = all_models["DepthFormer"](x)
        both = all_models["SegDepthFormer"](x)
    assert isinstance(seg, torch.Tensor) and seg.shape == (2, 4, 64, 128)
    assert set(depth) == {"depth", "depth_var"}
    assert set(both) == {"logits", "depth", "depth_var"}
    assert both["logits"].shape == (2, 4, 64, 128)
    for out in (depth, both):
        assert out["depth"].shape == out["depth_var"].shape == (2, 64, 128)
        assert (out["depth"] >= 0).all() and (out["depth_var"] > 0).all()


def test_former_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = SegDepthFormer("mit_b0", 3, dropout=0.5)
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 2
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)["logits"], model(x)["logits"])
        for m in model.modules():  # MC dropout: only the dropout layers in train mode
            if isinstance(m, torch.nn.Dropout2d):
                m.train()
        assert not torch.equal(model(x)["logits"], model(x)["logits"])


def test_former_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SegDepthFormer("mit_b0")
    with pytest.raises(ValueError, match="dropout"):
        DepthFormer("mit_b0", dropout=1.5)
    with pytest.raises(ValueError, match="unknown encoder"):
        SegFormer("mit_b9", 3)


# --------------------------------------------------------------------------- helpers, ensembles
def test_param_groups_partition_every_parameter_once(all_models):
    for name, model in all_models.items():
        enc, other = param_groups(model)
        ids = [id(p) for p in enc + other]
        assert len(ids) == len(set(ids)) == len(list(model.parameters())), name
        assert enc and other, name
        assert [id(p) for p in model.encoder_parameters()] == [id(p) for p in enc], name
        assert [id(p) for p in model.decoder_parameters()] == [id(p) for p in other], name


def test_param_groups_encoder_is_the_encoder(segmenters):
    model = segmenters["Unet"]
    enc, _ = param_groups(model)
    assert [id(p) for p in enc] == [id(p) for p in model.encoder.parameters()]


@pytest.mark.parametrize("name", ["UNet-tiny", "DUDES-dlv3", "SegDepthFormer"])
def test_deepcopy_and_functional_call(all_models, name):
    model = all_models[name]
    clone = copy.deepcopy(model)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        ref = as_dict(model(X))
        for out in (as_dict(clone(X)), as_dict(functional_call(model, state, (X,)))):
            for key in ref:
                torch.testing.assert_close(out[key], ref[key])


def test_as_dict_and_count_parameters():
    t = torch.zeros(1, 2, 4, 4)
    assert as_dict(t)["logits"] is t
    d = {"logits": t}
    assert as_dict(d) is d
    with pytest.raises(ValueError, match="aux_params"):
        as_dict((t, t))
    net = unet_family("M128/4", 2)
    total = count_parameters(net)
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in net.encoder.parameters())
    assert count_parameters(net) == total - frozen
    assert count_parameters(net, trainable_only=False) == total


# --------------------------------------------------------------------------- Holder & Shafique
def test_class_wise_student_head_is_c_times_the_dudes_head():
    baseline = build_segmenter("DeepLabV3Plus", "resnet18", 19)
    student = models.ClassWiseUncertaintyStudent(baseline)
    assert count_parameters(student) - count_parameters(baseline) == 19 * 257
    unet = unet_family("M128/4", 3)
    student = models.ClassWiseUncertaintyStudent(unet)
    assert student.segmenter is unet
    assert count_parameters(student) - count_parameters(unet) == 3 * (4 + 1)


def test_class_wise_student_outputs_read_the_map_at_the_predicted_class():
    torch.manual_seed(0)
    student = models.ClassWiseUncertaintyStudent(unet_family("M128/4", 4)).eval()
    with torch.no_grad():
        out = student(X)
    assert set(out) == {"logits", "class_uncertainty", "uncertainty"}
    assert out["class_uncertainty"].shape == (2, 4, 64, 64)
    assert out["uncertainty"].shape == (2, 64, 64)
    assert 0 <= out["class_uncertainty"].min() and out["class_uncertainty"].max() <= 1
    pred = out["logits"].argmax(1)
    for b, i, j in [(0, 0, 0), (1, 10, 33), (0, 63, 63)]:
        assert out["uncertainty"][b, i, j] == out["class_uncertainty"][b, pred[b, i, j], i, j]
    seg = models.ClassWiseUncertaintyStudent(SegFormer("mit_b0", 3)).eval()
    with torch.no_grad():
        out = seg(torch.rand(1, 3, 32, 64))
    assert out["class_uncertainty"].shape == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="forward_features"):
        models.ClassWiseUncertaintyStudent(torch.nn.Conv2d(3, 3, 1))


# --------------------------------------------------------------------------- light U-Net teachers
@pytest.mark.parametrize("encoder", ["tu-resnet10t", "tu-mobilenetv2_050"])
def test_light_unet_builds_small_honest_teachers(encoder):
    model = models.light_unet(encoder, 5, encoder_depth=3, decoder_channels=(16, 8, 8))
    assert model.output_stride == 8
    assert count_parameters(model) < 600_000  # timm builds only the stages used
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 48)).shape == (2, 5, 32, 48)


def test_light_unet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decoder_channels"):
        models.light_unet("tu-resnet10t", 5, encoder_depth=3, decoder_channels=(16, 8))
    with pytest.raises(ValueError, match="tu-"):
        models.light_unet("tu-no_such_net", 5)


def test_dudes_prior_init_starts_the_head_at_the_given_uncertainty():
    """``init_uncertainty``: the head outputs that value everywhere before training (zero weights,
    bias logit(value)), for DUDES and the class-wise student; the segmentation is untouched."""
    torch.manual_seed(0)
    seg = unet_family("M128/4", 4)
    x = torch.rand(2, 3, 32, 64)
    for cls in (DUDESStudent, models.ClassWiseUncertaintyStudent):
        torch.manual_seed(1)
        plain = cls(copy.deepcopy(seg)).eval()
        torch.manual_seed(1)
        prior = cls(copy.deepcopy(seg), init_uncertainty=0.03).eval()
        out, ref = prior(x), plain(x)
        torch.testing.assert_close(out["uncertainty"], torch.full_like(out["uncertainty"], 0.03))
        torch.testing.assert_close(out["logits"], ref["logits"])
        assert not torch.allclose(ref["uncertainty"], out["uncertainty"])
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            DUDESStudent(copy.deepcopy(seg), init_uncertainty=bad)

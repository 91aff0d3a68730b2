"""Models: smp segmenters, the plain U-Net family, the DUDES student and the EMUFormer *Formers.

Every model here follows the same small protocol, so losses, ensembles and training treat them alike:

- ``forward(x)`` validates ``x`` (4-D float tensor ``[B, 3, H, W]`` with H and W divisible by
  ``model.output_stride``) and raises a ``ValueError`` that says which sizes would fit;
- a plain segmenter returns logits ``[B, C, H, W]``; multi-output models return a dict
  (``as_dict`` turns a bare tensor into ``{"logits": t}``);
- ``param_groups(model)`` splits the parameters into (encoder, everything else) for the 10x decoder
  learning rate of DUDES; every model also has ``encoder_parameters()``/``decoder_parameters()``;
- segmenters expose ``forward_features(x)`` (the decoder's last feature map) and
  ``segmentation_head`` (features -> logits), which is what ``DUDESStudent`` builds on;
- ``WithFeatures(model)`` returns ``{"logits", "features"}`` from one pass, for feature-level KD
  (SKD's pair-wise loss, IFVD); ``pspnet`` is the dilated PSPNet those papers distil;
- all are plain ``nn.Module`` s: ``copy.deepcopy`` and ``torch.func.functional_call`` work.

Parameter counts (measured with ``count_parameters``):

======================================  ===========  ========================================
model                                   parameters   note
======================================  ===========  ========================================
``unet_family("M128/4", 6)``                 30,566  M128 at 1/4 width (depth 3, bridge 32)
``unet_family("M128", 6)``                  482,822  3 levels, 16-32-64, bridge 128
``unet_family("M256", 6)``                1,942,662  4 levels, 16-...-128, bridge 256
``unet_family("M512", 6)``                7,778,694  5 levels, 16-...-256, bridge 512
``unet_family("M1024", 6)``              31,116,166  6 levels, 16-...-512, bridge 1024
DeepLabV3+ ResNet18, 19 classes          12,333,923  DUDES Table 3 "Baseline": 12,333,923
``DUDESStudent`` of the above            12,334,180  +257, as in DUDES Table 3
``SegFormer("mit_b0", 19)``               3,719,027  decoder dim 256
``SegDepthFormer("mit_b0", 19)``          4,114,293
``SegFormer("mit_b2", 19)``              27,361,235  EMUFormer Table 1: 27.3M
``DepthFormer("mit_b2")``                27,348,162  EMUFormer Table 1: 27.3M
``SegDepthFormer("mit_b2", 19)``         30,513,109  EMUFormer Table 1: 30.5M
``pspnet("resnet18", 19)``               12,621,907  SKD's PSPNet-R18: 13.07M with aux head
``pspnet("resnet101", 19)``              65,583,187  SKD's PSPNet-R101: 70.44M with aux head
======================================  ===========  ========================================

Pretrained weights: ``pretrained=True`` fetches the encoder's ImageNet weights from the Hugging Face
hub (``smp-hub/<encoder>.imagenet``), or from its local cache when ``HF_HUB_OFFLINE=1``. If neither
works it raises a ``RuntimeError`` at once (the hub is probed with a 3-second timeout first, so a
machine without network never hangs). ``weights_path=`` loads a local state dict instead.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import socket
import threading
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minikd.metrics import count_parameters  # re-exported: one definition, in metrics.py

__all__ = [
    "PSPNET_ENCODERS",
    "SMALL_MIT",
    "SUPPORTED_ARCHS",
    "SUPPORTED_ENCODERS",
    "TEACHERS_FILE",
    "UNET_PRESETS",
    "ZOO_BUILDERS",
    "ZOO_DIR",
    "ZOO_MANIFEST",
    "AllMLPDecoder",
    "ClassWiseUncertaintyStudent",
    "DUDESStudent",
    "DepthFormer",
    "FormerTrunk",
    "MergedClasses",
    "PSPDecoder",
    "SegDepthFormer",
    "SegDepthHead",
    "SegFormer",
    "Segmenter",
    "UNet",
    "WithFeatures",
    "ZooError",
    "as_dict",
    "build_segmenter",
    "check_input",
    "count_parameters",
    "light_unet",
    "load_encoder_weights",
    "load_teachers",
    "param_groups",
    "pretrained",
    "pspnet",
    "segdepthformer_sub_ensemble",
    "set_encoder_dropout",
    "unet_family",
    "unet_preset",
    "zoo_entry",
    "zoo_manifest",
]

SUPPORTED_ARCHS: tuple[str, ...] = ("Unet", "DeepLabV3Plus", "PSPNet", "Segformer")
SUPPORTED_ENCODERS: tuple[str, ...] = (
    "resnet18", "resnet50", "resnet101", "vgg16", "vgg16_bn", "mobilenet_v2", "efficientnet-b0",
    "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
)  # fmt: skip
_ARCH_ALIASES = {
    "unet": "Unet",
    "deeplabv3plus": "DeepLabV3Plus",
    "deeplabv3+": "DeepLabV3Plus",
    "pspnet": "PSPNet",
    "segformer": "Segformer",
}
HUB_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------- input validation
def _fitting_sizes(n: int, stride: int) -> list[int]:
    """The multiples of ``stride`` just below and above ``n`` (``n`` itself if it fits)."""
    if n % stride == 0:
        return [n]
    below = n // stride * stride
    return [s for s in (below, below + stride) if s > 0]


def check_input(x: object, stride: int, name: str, in_channels: int = 3) -> None:
    """Raise a ``ValueError`` unless ``x`` is a float ``[B, in_channels, H, W]`` batch fitting ``stride``.

    Args:
        x: the model input.
        stride: H and W must be multiples of it (the model's ``output_stride``).
        name: the model's name, for the message.
        in_channels: expected number of channels.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong rank, dtype, channels or size; says what would fit and what to do.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor [B, {in_channels}, H, W]; got {type(x)}.")
    shape = tuple(x.shape)
    if x.ndim != 4:
        hint = " For a single image use x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ValueError(f"{name} expects a 4-D batch [B, {in_channels}, H, W]; got shape {shape}."
                         + hint)
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point image batch; got dtype {x.dtype} with "
                         f"shape {shape}. Convert with x.float() / 255 and normalise it first.")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} channels (RGB) in dim 1; got shape {shape}."
                         " Channels-last images need x.permute(0, 3, 1, 2).")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        hs, ws = _fitting_sizes(h, stride), _fitting_sizes(w, stride)
        raise ValueError(
            f"{name} needs H and W divisible by its output stride {stride}; got shape {shape} "
            f"(H={h}, W={w}). Nearest sizes that fit: H in {hs}, W in {ws}. Pad or crop the "
            f"input, e.g. to {hs[-1]}x{ws[-1]} with torch.nn.functional.pad."
        )


def _check_num_classes(num_classes: object, who: str) -> None:
    """ValueError unless ``num_classes`` is a positive int (the one check every builder uses)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{who} needs num_classes, a positive int (the number of output "
                         f"classes, e.g. 19 for Cityscapes); got {num_classes!r}.")


# --------------------------------------------------------------------------- encoder weights
def _hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or at import."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (DNS included).

    The probe runs in a daemon thread so that a hanging DNS lookup cannot block the caller.
    """
    from huggingface_hub import constants

    url = urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _weights_error(encoder: str, reason: str) -> RuntimeError:
    return RuntimeError(
        f"The ImageNet weights for encoder '{encoder}' could not be fetched ({reason}). "
        "To proceed: build it with pretrained=False (random initialisation; fine on ToyCity), or "
        f"download smp-hub/{encoder}.imagenet/model.safetensors on a machine with network and "
        "pass weights_path='path/to/model.safetensors'."
    )


def _fetch_imagenet_weights(encoder: str) -> Path:
    """Path of the encoder's ImageNet ``model.safetensors`` (hub or local cache), or RuntimeError."""
    from huggingface_hub import hf_hub_download

    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if "imagenet" not in settings:
        raise ValueError(f"encoder '{encoder}' has no ImageNet weights in smp; available: "
                         f"{list(settings)}. Use pretrained=False or weights_path=.")
    if _hub_offline():
        offline, reason = True, "HF_HUB_OFFLINE is set and they are not in the local cache"
    elif not _hub_reachable():
        offline = True  # only the local cache can help now; never wait for connection timeouts
        reason = (f"the hub did not answer within {HUB_PROBE_TIMEOUT_S:g} s and they are not in "
                  "the local cache")
    else:
        offline, reason = False, "download failed"
    repo, revision = settings["imagenet"]["repo_id"], settings["imagenet"]["revision"]
    try:
        path = hf_hub_download(repo, "model.safetensors", revision=revision,
                               local_files_only=offline, etag_timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # LocalEntryNotFoundError, HTTP errors, timeouts: all mean "not here"
        raise _weights_error(encoder, f"{reason}: {type(err).__name__}") from err
    return Path(path)


def load_encoder_weights(encoder: nn.Module, weights_path: str | os.PathLike) -> None:
    """Load a local state dict (``.safetensors`` or a torch file) into ``encoder``.

    A whole-model state dict also works: keys starting with ``"encoder."`` are taken and stripped.

    Args:
        encoder: the encoder module (e.g. ``model.encoder``).
        weights_path: the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable state dict (corrupted, or holding pickled Python
            objects, which are never unpickled: ``weights_only=True``).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path={str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises almost anything
        from minikd.training import _load_error_reason

        raise ValueError(
            f"weights_path={str(path)!r} is not a readable file of encoder weights "
            f"({_load_error_reason(e)}). Pass a .safetensors file or a plain state dict saved with "
            "torch.save(model.encoder.state_dict(), path).") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(
            f"weights_path={str(path)!r} holds a {type(state).__name__}, not a state dict "
            "{name: tensor}; save one with torch.save(model.encoder.state_dict(), path).")
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    encoder.load_state_dict(state)


def _init_encoder(encoder: nn.Module, name: str, pretrained: bool,
                  weights_path: str | os.PathLike | None) -> None:
    """Load ImageNet weights into a freshly built encoder as requested (no-op for random init)."""
    if weights_path is not None:
        load_encoder_weights(encoder, weights_path)
    elif pretrained:
        load_encoder_weights(encoder, _fetch_imagenet_weights(name))


# --------------------------------------------------------------------------- parameter groups
def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (encoder, other): every parameter lands in exactly one list.

    A parameter belongs to the encoder when one of the module names on its path is ``encoder``
    (smp models, ``UNet``'s down path, the *Formers' shared encoder, a wrapped segmenter's encoder).

    Args:
        model: any model of this module (or any module naming its backbone ``encoder``).

    Returns:
        (encoder_params, other_params), for the decoder's 10x learning rate (DUDES §4).

    References:
        Landgraf et al., DUDES (2023), §4 "Training". Taught in notebooks/03_dudes.ipynb.
    """
    encoder, other = [], []
    for name, p in model.named_parameters():
        (encoder if "encoder" in name.split(".")[:-1] else other).append(p)
    return encoder, other


class _ParamGroupsMixin:
    """``encoder_parameters()`` / ``decoder_parameters()`` via ``param_groups``."""

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder (backbone)."""
        return iter(param_groups(self)[0])

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of everything else: decoder(s) and head(s)."""
        return iter(param_groups(self)[1])


# --------------------------------------------------------------------------- smp segmenters
class Segmenter(_ParamGroupsMixin, nn.Module):
    """An smp model with input validation; keeps smp's ``encoder/decoder/segmentation_head`` names.

    The state dict keys equal smp's, so smp checkpoints load unchanged.

    Args:
        model: an ``smp`` segmentation model without auxiliary head.
        name: a readable name for messages, e.g. ``"DeepLabV3Plus-resnet18"``.
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.segmentation_head = model.segmentation_head
        self.name = name or getattr(model, "name", type(model).__name__)
        self.output_stride = int(model.encoder.output_stride)
        self.needs_batch_gt1_in_train = isinstance(model, smp.DeepLabV3Plus)

    def forward_features(self, x: Tensor) -> Tensor:
        """Validated input -> the decoder's last feature map (before the segmentation head)."""
        check_input(x, self.output_stride, self.name)
        if self.training and self.needs_batch_gt1_in_train and x.shape[0] == 1:
            raise ValueError(
                f"{self.name} in train mode needs a batch of at least 2; got shape "
                f"{tuple(x.shape)}. Its ASPP image-pooling branch applies BatchNorm to one value "
                "per channel. Use batch_size >= 2 with drop_last=True, or call model.eval()."
            )
        return self.decoder(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]``."""
        return self.segmentation_head(self.forward_features(x))


def _canonical_arch(arch: str) -> str:
    key = str(arch).lower().replace("_", "").replace("-", "")
    if key not in _ARCH_ALIASES:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}.")
    return _ARCH_ALIASES[key]


def _check_encoder(encoder: str) -> None:
    if encoder in SUPPORTED_ENCODERS or encoder in smp.encoders.get_encoder_names():
        return
    close = difflib.get_close_matches(str(encoder), SUPPORTED_ENCODERS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown encoder {encoder!r}; supported: {', '.join(SUPPORTED_ENCODERS)} "
                     "(or any name in segmentation_models_pytorch.encoders.get_encoder_names())."
                     + hint)


def build_segmenter(arch: str, encoder: str, num_classes: int, pretrained: bool = False,
                    weights_path: str | os.PathLike | None = None) -> Segmenter:
    """Build an smp segmenter (Unet, DeepLabV3Plus, PSPNet or Segformer) with input validation.

    Args:
        arch: "Unet", "DeepLabV3Plus" (or "DeepLabV3+"), "PSPNet" or "Segformer"; case-insensitive.
        encoder: one of ``SUPPORTED_ENCODERS`` (resnet18/50/101, vgg16(_bn), mobilenet_v2,
            efficientnet-b0, mit_b0..mit_b5) or another smp encoder name.
        num_classes: output channels.
        pretrained: load ImageNet encoder weights (hub or local cache; RuntimeError at once if
            neither has them). ``False`` never touches the network.
        weights_path: a local encoder (or whole-model) state dict to load instead of the hub.

    Returns:
        A ``Segmenter``; ``forward(x)`` gives logits ``[B, num_classes, H, W]``. Output strides
        (H, W must be multiples): Unet 32, DeepLabV3Plus 16, PSPNet 8, Segformer 32.

    Raises:
        ValueError: unknown arch/encoder or a combination smp cannot build (DeepLabV3Plus + VGG).
        RuntimeError: ``pretrained=True`` and the weights cannot be had.

    References:
        Iakubovskii, segmentation-models-pytorch. DeepLabV3+ ResNet18 is the DUDES baseline
        (Landgraf et al. 2023, §4). Taught in notebooks/02_unet_ensemble_weighting.ipynb and
        notebooks/03_dudes.ipynb.
    """
    arch = _canonical_arch(arch)
    _check_encoder(encoder)
    _check_num_classes(num_classes, "build_segmenter")
    if arch == "DeepLabV3Plus" and encoder.startswith("vgg"):  # checked before a slow build
        raise ValueError(f"DeepLabV3Plus cannot use encoder {encoder!r}: it needs a dilated "
                         "(atrous) encoder, and VGG models do not support dilated mode (they "
                         "downsample by max-pooling). Pick e.g. 'resnet18' or 'mobilenet_v2'.")
    try:
        model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=num_classes)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ValueError(f"{arch} cannot use encoder {encoder!r}: {err} Pick another encoder, "
                         "e.g. 'resnet18' or 'mobilenet_v2'.") from err
    _init_encoder(model.encoder, encoder, pretrained, weights_path)
    return Segmenter(model, name=f"{arch}-{encoder}")


# --------------------------------------------------------------------------- dilated PSPNet (SKD)
#: Encoders ``pspnet`` accepts: smp's (torchvision-layout) ResNets, whose strides can be dilated.
PSPNET_ENCODERS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")


class PSPDecoder(nn.Module):
    """PSPNet's head without the classifier: pyramid pooling, then a 3x3 fusion conv.

    Bins (1, 2, 3, 6) each pool the last stage, reduce it to ``in_channels / 4`` by a 1x1 conv
    (+ BN + ReLU; smp's ``PSPModule``, whose 1x1 bin has no BN) and are upsampled back; their
    concatenation with the input (``2 * in_channels``) is fused by a 3x3 conv + BN + ReLU and
    ``Dropout2d(dropout)``.

    Args:
        in_channels: channels of the last encoder stage (512 for ResNet18/34, 2048 for 50/101).
        out_channels: channels of the fused features.
        dropout: rate of the ``Dropout2d`` after the fusion (PSPNet, SKD: 0.1).

    References:
        Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, §3.3 and Fig. 3.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1):
        super().__init__()
        from segmentation_models_pytorch.base.modules import Conv2dReLU
        from segmentation_models_pytorch.decoders.pspnet.decoder import PSPModule

        self.psp = PSPModule(in_channels, sizes=(1, 2, 3, 6))
        self.fuse = Conv2dReLU(2 * in_channels, out_channels, kernel_size=3, padding=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Encoder features (the last one is used) -> fused features at the same size."""
        return self.dropout(self.fuse(self.psp(features[-1])))


def pspnet(encoder: str, num_classes: int, pretrained: bool = False,
           weights_path: str | os.PathLike | None = None, output_stride: int = 8,
           psp_out_channels: int | None = None) -> Segmenter:
    """The dilated PSPNet of SKD, IFVD, CIRKD and Niemann et al.: ResNet18/101 student/teacher.

    A ResNet whose layer3 and layer4 keep their resolution (strides 1, dilations 2 and 4: output
    stride 8), the pyramid pooling module (bins 1, 2, 3, 6) on layer4, a 3x3 fusion conv + BN +
    ReLU + ``Dropout2d(0.1)`` (``forward_features``: the features SKD's pair-wise loss and
    IFVD distil, at 1/8 of the input), a 1x1 classifier and bilinear upsampling x8
    (``segmentation_head``). Built from smp pieces: ``smp.encoders.get_encoder(...,
    output_stride=8)`` dilates the encoder, smp's ``PSPModule`` pools.

    Not smp's ``PSPNet``: that one defaults to ``encoder_depth=3`` and reaches output stride 8 by
    *cutting the encoder after layer2* (no dilation, PPM on 128 layer2 channels for ResNet18),
    with a 1x1 fusion conv and dropout 0.2; ``build_segmenter("PSPNet", ...)`` builds that.

    Fused channels (``psp_out_channels``) follow SKD's code: ``in_channels / 4`` of the last
    stage, so **128 for ResNet18/34 and 512 for ResNet50/101**; CIRKD also uses 128 for ResNet18.
    The pair-wise (SKD) and IFV losses compare similarity maps, so student and teacher widths may
    differ. Parameters with 19 classes: ResNet18 12,621,907; ResNet101 65,583,187.

    Differences from SKD's network (``pspnet_combine.py``; IFVD reuses it), left out for
    simplicity: SKD's ResNet (CCNet style) has a deep stem of three 3x3 convs (64-64-128;
    +148,480 parameters for ResNet18, +123,776 for ResNet101) and a ceil-mode max-pool; it uses
    InPlace-ABN (synchronised BN + leaky ReLU) where this uses BN + ReLU; its 1x1 pooling bin has
    a BN where smp's has a conv bias (+128 / +512); and it trains an auxiliary DSN head on layer3
    (3x3 conv, BN, dropout, classifier; loss weight 0.4; +297,747 / +4,729,875), omitted here
    (``forward`` returns the main logits only). With all of these SKD's ResNet18 has 13,068,262
    parameters and its ResNet101 70,437,350; CIRKD's ResNet18 (deep stem, smaller FCN auxiliary
    head) about 12,919,334: the 12.9-13.1 M reported for PSPNet-R18. ImageNet weights are smp's
    torchvision-layout ResNets, as Niemann et al. use (torchvision v0.12).

    Args:
        encoder: "resnet18" (student), "resnet101" (teacher), "resnet34" or "resnet50".
        num_classes: output classes (19 for Cityscapes).
        pretrained: load the encoder's ImageNet weights (hub or local cache; ``RuntimeError`` at
            once if neither has them). ``False`` never touches the network.
        weights_path: a local encoder (or whole-model) state dict to load instead.
        output_stride: 8 (SKD: dilations 2 and 4), 16 (layer4 dilated by 2) or 32 (plain
            ResNet, no dilation).
        psp_out_channels: fused feature channels; ``None`` for SKD's (128 or 512, see above).

    Returns:
        A ``Segmenter`` named e.g. ``"PSPNet-resnet18-d8"``: ``forward(x)`` gives logits
        ``[B, num_classes, H, W]``, ``forward_features(x)`` the fused features
        ``[B, psp_out_channels, H/8, W/8]``; H and W must be multiples of ``output_stride``.

    Raises:
        ValueError: an encoder other than a ResNet of ``PSPNET_ENCODERS``, an unsupported
            ``output_stride``, or a bad ``num_classes``/``psp_out_channels``.
        RuntimeError: ``pretrained=True`` and the weights cannot be had.

    References:
        Zhao et al., PSPNet, CVPR 2017; Liu et al., "Structured Knowledge Distillation for
        Semantic Segmentation" (SKD), CVPR 2019, §4; Niemann et al. 2023 §5.2 (PSPNet-R101
        teacher, PSPNet-R18 student, as SKD). Taught in notebooks/06_fair_baselines.ipynb
        (full mode).
    """
    _check_num_classes(num_classes, "pspnet")
    if encoder not in PSPNET_ENCODERS:
        raise ValueError(f"pspnet needs a ResNet encoder it can dilate, one of "
                         f"{list(PSPNET_ENCODERS)}; got {encoder!r}. SKD uses 'resnet18' for the "
                         "student and 'resnet101' for the teacher; for other encoders use "
                         "build_segmenter('PSPNet', encoder, ...).")
    if not isinstance(output_stride, int) or output_stride not in (8, 16, 32):
        raise ValueError(f"pspnet supports output_stride 8 (SKD), 16 or 32; got "
                         f"{output_stride!r}. Use 8 for the PSPNet of SKD and Niemann et al.")
    in_channels = smp.encoders.encoders[encoder]["params"]["out_channels"][-1]  # 512 or 2048
    out_channels = in_channels // 4 if psp_out_channels is None else psp_out_channels
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"psp_out_channels must be a positive int or None (SKD's width, "
                         f"{in_channels // 4} for {encoder}); got {psp_out_channels!r}.")
    model = types.SimpleNamespace(  # the three parts Segmenter takes from an smp model
        encoder=smp.encoders.get_encoder(encoder, depth=5, weights=None,
                                         output_stride=output_stride),
        decoder=PSPDecoder(in_channels, out_channels, dropout=0.1))
    model.segmentation_head = smp.base.SegmentationHead(out_channels, num_classes, kernel_size=1,
                                                        upsampling=output_stride)
    _init_encoder(model.encoder, encoder, pretrained, weights_path)
    return Segmenter(model, name=f"PSPNet-{encoder}-d{output_stride}")


class WithFeatures(_ParamGroupsMixin, nn.Module):
    """A segmenter that returns its features with its logits, from one forward pass.

    Feature-level KD losses (SKD's pair-wise loss, IFVD) need the student's and the teacher's
    features as well as their logits; this wrapper gives both without a second pass. The
    features are what ``model.forward_features`` returns: for ``pspnet`` the fused PSP features
    at 1/8 of the input, for ``UNet`` the last decoder map at full resolution, for a
    ``SegFormer`` the fused features at 1/4. The logits equal ``model(x)`` exactly.
    ``param_groups``/``encoder_parameters()`` see through the wrapper (the backbone stays under
    a module named ``encoder``); the state dict keys gain the prefix ``model.``.

    Args:
        model: anything with ``forward_features(x)`` and ``segmentation_head`` (``Segmenter``,
            ``pspnet``, ``UNet``, ``SegFormer``).

    Returns (forward):
        ``{"logits": [B, C, H, W], "features": [B, F, h, w]}``.

    Raises:
        ValueError: ``model`` lacks ``forward_features`` or ``segmentation_head``.

    References:
        Liu et al., SKD (CVPR 2019) §3.1; Wang et al., IFVD (ECCV 2020). Taught in
        notebooks/06_fair_baselines.ipynb.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [a for a in ("forward_features", "segmentation_head") if not hasattr(model, a)]
        if missing:
            raise ValueError(f"WithFeatures needs a model with forward_features(x) and "
                             f"segmentation_head; {type(model).__name__} lacks {missing}. Wrap a "
                             "Segmenter (build_segmenter, pspnet), a UNet or a SegFormer, not a "
                             "model that already returns a dict.")
        self.model = model
        self.output_stride = getattr(model, "output_stride", 1)
        self.name = f"WithFeatures({getattr(model, 'name', type(model).__name__)})"

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"logits", "features"}``; logits upsampled to ``x``'s size if the head does not."""
        features = self.model.forward_features(x)
        logits = self.model.segmentation_head(features)
        if logits.shape[-2:] != x.shape[-2:]:  # heads without their own upsampling (SegFormer)
            logits = _upsample(logits, x)
        return {"logits": logits, "features": features}


# --------------------------------------------------------------------------- plain U-Net family
UNET_PRESETS: dict[str, tuple[int, int, bool]] = {
    # name: (depth = encoder levels, bridge filters, batch_norm)
    "M128": (3, 128, True),
    "M256": (4, 256, True),
    "M512": (5, 512, True),
    "M1024": (6, 1024, True),
    "M1024*": (6, 1024, False),  # the paper's M1024 without BatchNorm (Table II)
}


def _double_conv(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    """(3x3 conv -> [BatchNorm] -> ReLU) twice, the U-Net building block."""
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(_ParamGroupsMixin, nn.Module):
    """The plain U-Net of the U-Net KD paper: ``depth`` levels, filters doubling up to the bridge.

    Level ``i`` (0-based) has ``bridge_filters / 2**(depth - i)`` filters, so M128 is 16-32-64 and
    bridge 128, and M1024 is 16-32-64-128-256-512 and bridge 1024 (the paper names the models by
    the bridge and gives 3/4/5/6 encoder levels; the first level's 16 filters follow from that
    naming). Down: double 3x3 conv then 2x2 max-pool. Up: 2x2 transposed conv halving the
    channels, concatenation with the skip, double 3x3 conv. Head: 1x1 conv to the classes.

    Args:
        depth: number of encoder levels (max-pools); the output stride is ``2**depth``.
        bridge_filters: filters of the bridge convolutions; must be divisible by ``2**depth``.
        batch_norm: BatchNorm after every conv (M1024* of the paper has none).
        num_classes: output channels.
        in_channels: input channels.

    References:
        Ronneberger et al. 2015; the U-Net KD paper (../shared/papers/unet_kd_ensemble_teachers.md,
        §IV, Table II). Taught in notebooks/01_vanilla_kd_temperature.ipynb and
        notebooks/02_unet_ensemble_weighting.ipynb.
    """

    def __init__(self, depth: int, bridge_filters: int, batch_norm: bool = True, *,
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        _check_num_classes(num_classes, "UNet")
        if depth < 1 or bridge_filters % 2**depth or bridge_filters < 2**depth:
            raise ValueError(f"UNet needs depth >= 1 and bridge_filters a positive multiple of "
                             f"2**depth={2**depth}; got depth={depth}, "
                             f"bridge_filters={bridge_filters}.")
        filters = [bridge_filters // 2 ** (depth - i) for i in range(depth)]
        self.in_channels, self.output_stride = in_channels, 2**depth
        self.name = f"UNet(depth={depth}, bridge={bridge_filters})"
        self.encoder = nn.ModuleList(
            _double_conv(c_in, c, batch_norm) for c_in, c in zip([in_channels] + filters, filters)
        )
        self.bridge = _double_conv(filters[-1], bridge_filters, batch_norm)
        ups = [bridge_filters] + filters[::-1]
        self.up = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in ups[:-1])
        self.decoder = nn.ModuleList(_double_conv(c, c // 2, batch_norm) for c in ups[:-1])
        self.segmentation_head = nn.Conv2d(filters[0], num_classes, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Validated input -> the last decoder feature map ``[B, filters[0], H, W]``."""
        check_input(x, self.output_stride, self.name, self.in_channels)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bridge(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = block(torch.cat([skip, up(x)], dim=1))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]``."""
        return self.segmentation_head(self.forward_features(x))


def unet_preset(name: str) -> tuple[int, int, bool]:
    """(depth, bridge filters, batch_norm) of a family name: a preset, or ``"<preset>/<d>"``, the
    preset with every width divided by ``d`` (``"M128/4"``: 4-8-16, bridge 32). One name per
    network: the paper's names are the paper's widths; a shrunk variant says how much."""
    base, _, div = name.partition("/")
    if base not in UNET_PRESETS or (div and (not div.isdigit() or int(div) < 1)):
        raise ValueError(f"unknown U-Net name {name!r}; expected one of {list(UNET_PRESETS)}, "
                         "optionally followed by '/d' for the same network at 1/d of its widths "
                         "(e.g. 'M128/4').")
    depth, bridge, batch_norm = UNET_PRESETS[base]
    d = int(div or 1)
    if bridge % (d * 2**depth):
        raise ValueError(f"{name!r}: {base}'s bridge of {bridge} filters / {d} is not a multiple "
                         f"of 2**depth = {2**depth}; choose a divisor of {bridge // 2**depth}.")
    return depth, bridge // d, batch_norm


def unet_family(name: str, num_classes: int, in_channels: int = 3) -> UNet:
    """A network of the U-Net KD paper's family, at the paper's widths or shrunk.

    ========  =====  ======  ===============  ==================
    name      depth  bridge  level filters    params (6 classes)
    ========  =====  ======  ===============  ==================
    M128      3      128     16-32-64                    482,822
    M256      4      256     16-32-64-128              1,942,662
    M512      5      512     16-...-256                7,778,694
    M1024     6      1024    16-...-512               31,116,166
    M1024*    6      1024    as M1024, no BN          31,110,086
    M128/4    3      32      4-8-16                       30,566
    M1024/4   6      256     4-...-128                 1,947,334
    ========  =====  ======  ===============  ==================

    ``"<name>/<d>"`` is the same network at 1/d of every width (depth unchanged): the CPU-sized
    variants of the notebooks (``M128/4`` … ``M1024/4`` in notebook 02's quick mode; ``M256/4``
    is notebook 01's student ``UNet(4, 64)``).

    Args:
        name: "M128", "M256", "M512", "M1024" or "M1024*" (without BatchNorm), optionally with
            "/d" (see ``unet_preset``).
        num_classes: output channels.
        in_channels: input channels.

    Returns:
        The ``UNet``.

    References:
        U-Net KD paper, §IV and Table II. Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    depth, bridge, batch_norm = unet_preset(name)
    return UNet(depth, bridge, batch_norm, num_classes=num_classes, in_channels=in_channels)


class MergedClasses(nn.Module):
    """A segmenter over coarser classes: each new class is the union of some of the old ones.

    The probability of a union is the sum of its members' probabilities, so the new logits are
    z'_k = log Σ_{c: class_map[c] = k} exp(z_c): softmax(z') sums softmax(z) over each group
    exactly (at τ = 1; a student softened at τ sees these logits / τ). Notebook 02 merges the
    zoo's 17-class ToyCity teachers into the U-Net KD paper's 6 classes
    (``data.unet_kd_class_map``).

    Args:
        model: returns logits ``[B, C, H, W]``.
        class_map: C ids, ``class_map[c]`` = the new class of old class ``c``; every new class
            0..K-1 must receive at least one old class.

    References:
        U-Net KD paper, Table I (the 6 classes). Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """

    def __init__(self, model: nn.Module, class_map: Sequence[int]):
        super().__init__()
        ids = torch.as_tensor(list(class_map), dtype=torch.long)
        k = int(ids.max()) + 1 if ids.numel() else 0
        missing = sorted(set(range(k)) - set(ids.tolist()))
        if ids.ndim != 1 or not ids.numel() or int(ids.min()) < 0 or missing:
            raise ValueError(f"class_map={list(class_map)!r}; expected one id >= 0 per old class "
                             f"with every new class 0..K-1 used (missing: {missing}).")
        self.model = model
        self.register_buffer("groups", F.one_hot(ids, k).T.float(), persistent=False)  # [K, C]

    @property
    def num_classes(self) -> int:
        return self.groups.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Merged logits ``[B, K, H, W]``."""
        z = self.model(x)
        if z.shape[1] != self.groups.shape[1]:
            raise ValueError(f"the model gave {z.shape[1]} classes; class_map has "
                             f"{self.groups.shape[1]} entries. Pass one new id per model class.")
        top = z.amax(1, keepdim=True)  # log-sum-exp, stable
        summed = torch.einsum("kc,bchw->bkhw", self.groups.to(z.dtype), (z - top).exp())
        return summed.clamp_min(torch.finfo(summed.dtype).tiny).log() + top  # finite: no -inf


# --------------------------------------------------------------------------- DUDES student
def _uncertainty_head(segmentation_head: nn.Module) -> nn.Module:
    """A copy of ``segmentation_head`` with its (last) conv giving one channel, then a sigmoid."""
    head = copy.deepcopy(segmentation_head)
    convs = [n for n, m in head.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"the segmentation head has no Conv2d to copy: {segmentation_head}")
    old = head.get_submodule(convs[-1])
    new = nn.Conv2d(old.in_channels, 1, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None)
    if convs[-1] == "":
        head = new
    else:
        parent, _, attr = convs[-1].rpartition(".")
        setattr(head.get_submodule(parent), attr, new)
    for m in head.modules():  # fresh weights for any other layer the head had
        if m is not new and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return nn.Sequential(head, nn.Sigmoid())


class DUDESStudent(_ParamGroupsMixin, nn.Module):
    """The DUDES student: a segmenter plus an uncertainty head sharing its decoder.

    The uncertainty head is identical to the segmentation head except for one output channel and a
    sigmoid, so it adds ``in_channels * k * k + 1`` parameters: 257 for DeepLabV3+ ResNet18
    (256 decoder channels, 1x1 conv), as in DUDES Table 3.

    Args:
        segmenter: a ``Segmenter`` (``build_segmenter``), a raw smp model, a ``UNet`` or a
            ``SegFormer``: anything with ``forward_features`` and ``segmentation_head``.
        init_uncertainty: if given (in (0, 1)), the head starts at this value everywhere: the
            weights of its last conv are 0 and its bias is logit(init_uncertainty), a prior
            initialisation like RetinaNet's classification head. Pass the teacher's mean
            uncertainty on the training images. The paper does not say how its head starts.
            With the default init the head starts near sigmoid(0) = 0.5, far above targets that
            are mostly below 0.1. With SGD at the decoder's 10× rate, RMSLE's gradient (its size
            does not shrink with the error) can then push it into the flat end of the sigmoid,
            where it stays at 0: on ToyCity this happened in 2 of 3 seeds (notebook 03).

    References:
        Landgraf et al., DUDES (2023), §3 "Student" and Table 3. Taught in
        notebooks/03_dudes.ipynb.
    """

    def __init__(self, segmenter: nn.Module, init_uncertainty: float | None = None):
        super().__init__()
        if isinstance(segmenter, smp.base.SegmentationModel):
            segmenter = Segmenter(segmenter)
        if not (hasattr(segmenter, "forward_features") and hasattr(segmenter, "segmentation_head")):
            raise ValueError(f"{type(self).__name__} needs a segmenter with forward_features() "
                             f"and segmentation_head; got {type(segmenter).__name__}.")
        self.segmenter = segmenter
        self.uncertainty_head = self._make_uncertainty_head(segmenter.segmentation_head)
        self.output_stride = segmenter.output_stride
        if init_uncertainty is not None:
            self._prior_init(init_uncertainty)

    def _prior_init(self, value: float) -> None:
        """The head's last conv: weights 0, bias logit(value), so it outputs ``value``."""
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"init_uncertainty must lie strictly between 0 and 1 (a sigmoid "
                             f"output); got {value}. Pass the teacher's mean uncertainty, "
                             "e.g. the mean of the cached targets.")
        last = [m for m in self.uncertainty_head.modules() if isinstance(m, nn.Conv2d)][-1]
        if last.bias is None:
            raise ValueError("init_uncertainty needs a head whose last conv has a bias; this "
                             "segmenter's head has none.")
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(math.log(value / (1.0 - value)))

    def _make_uncertainty_head(self, segmentation_head: nn.Module) -> nn.Module:
        return _uncertainty_head(segmentation_head)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the uncertainty head's map, both at the input's resolution."""
        features = self.segmenter.forward_features(x)
        logits = self.segmenter.segmentation_head(features)
        uncertainty = self.uncertainty_head(features)
        if logits.shape[-2:] != x.shape[-2:]:  # heads without their own upsampling (SegFormer)
            logits = F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False)
            uncertainty = F.interpolate(uncertainty, x.shape[-2:], mode="bilinear",
                                        align_corners=False)
        return logits, uncertainty

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"logits": [B, C, H, W], "uncertainty": [B, H, W] in [0, 1]}``."""
        logits, uncertainty = self._heads(x)
        return {"logits": logits, "uncertainty": uncertainty[:, 0]}


# --------------------------------------------------------------------------- EMUFormer models
class AllMLPDecoder(nn.Module):
    """SegFormer's all-MLP decoder: per-stage linear to ``dim``, upsample to 1/4, concat, fuse.

    A per-pixel linear layer is written as a 1x1 convolution (the same operation).

    Args:
        in_channels: channels of the four encoder stages (strides 4, 8, 16, 32).
        dim: common embedding dimension (SegFormer: 256 for B0/B1, 768 for B2-B5).
        out_channels: classes for segmentation, 2 (mean, variance) for depth.
        dropout: dropout rate before the last layer (MC dropout at test time).

    References:
        Xie et al., SegFormer (2021), Eq. 4; EMUFormer (Landgraf et al. 2024), §3.2, Figs. 1-3.
    """

    def __init__(self, in_channels: list[int], dim: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(len(in_channels) * dim, dim, 1, bias=False),
                                  nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(dim, out_channels, 1)

    def forward_features(self, features: list[Tensor]) -> Tensor:
        """Stage features (finest first) -> fused features at the finest stage's size."""
        size = features[0].shape[-2:]
        ups = [F.interpolate(lin(f), size, mode="bilinear", align_corners=False)
               for lin, f in zip(self.linear, features)]
        return self.dropout(self.fuse(torch.cat(ups[::-1], dim=1)))

    def forward(self, features: list[Tensor]) -> Tensor:
        """Stage features -> ``[B, out_channels, H/4, W/4]``."""
        return self.head(self.forward_features(features))


def _upsample(t: Tensor, x: Tensor | tuple[int, ...]) -> Tensor:
    """Bilinear resize of ``t`` to the size of ``x`` (an input tensor or an ``(H, W)`` size)."""
    size = x.shape[-2:] if isinstance(x, Tensor) else x
    return F.interpolate(t, size, mode="bilinear", align_corners=False)


def _depth_outputs(raw: Tensor, x: Tensor | tuple[int, ...]) -> dict[str, Tensor]:
    """Two raw channels -> ReLU mean and Softplus variance ``[B, H, W]`` (EMUFormer Eqs. 4-5)."""
    raw = _upsample(raw, x)
    return {"depth": F.relu(raw[:, 0]), "depth_var": F.softplus(raw[:, 1])}


def set_encoder_dropout(encoder: nn.Module, p: float) -> int:
    """Give every ``nn.Dropout*`` layer of ``encoder`` the rate ``p``; returns how many.

    smp builds its MiT encoders from a fixed parameter table with ``drop_rate`` and
    ``attn_drop_rate`` 0 (``get_encoder`` passes no keyword to them), but it still creates the
    layers: ``Mlp.drop`` and ``Attention.proj_drop`` (``drop_rate``) and ``Attention.attn_drop``
    (``attn_drop_rate``) in every block. ``nn.Dropout`` reads ``self.p`` at each forward, so
    setting ``p`` after construction equals building the encoder with
    ``drop_rate = attn_drop_rate = p``, without depending on smp's constructor. Stochastic depth
    (``DropPath``, smp's drop_path_rate 0.1) is left as built: it is not an ``nn.Dropout`` and
    ``ensembles.MCDropout`` does not switch it on. An encoder without dropout layers (e.g. a
    ResNet) is left unchanged (returns 0).

    Args:
        encoder: the encoder module.
        p: dropout rate in [0, 1).

    Returns:
        The number of dropout layers set.

    References:
        EMUFormer (Landgraf et al. 2024) §4 "Monte Carlo Dropout" (dropout "throughout the entire
        network", rates 20 % and 50 %). Taught in notebook 04 (EMUFormer, planned).
    """
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for layer in layers:
        layer.p = float(p)
    return len(layers)


# MiT encoders shrunk for quick mode on a CPU (no ImageNet weights exist for them). The name says
# how: "mit_b0/2" is MiT-B0 at (about) half width (embedding dims 16-32-64-96 for 32-64-160-256)
# with one Transformer block per stage instead of two; patch embeddings, efficient
# self-attention with the same reduction ratios (8, 4, 2, 1) and Mix-FFN are B0's.
SMALL_MIT: dict[str, dict[str, Any]] = {
    "mit_b0/2": {"embed_dims": [16, 32, 64, 96], "num_heads": [1, 1, 2, 2],
                 "depths": [1, 1, 1, 1]},
}


def _mit_encoder(name: str) -> nn.Module:
    """An smp MiT encoder by name: smp's own (mit_b0..b5) or one of ``SMALL_MIT``."""
    if name not in SMALL_MIT:
        return smp.encoders.get_encoder(name, weights=None)
    from segmentation_models_pytorch.encoders.mix_transformer import (
        MixVisionTransformerEncoder,
        mix_transformer_encoders,
    )

    params = {**mix_transformer_encoders["mit_b0"]["params"], **SMALL_MIT[name]}
    params["out_channels"] = [3, 0, *SMALL_MIT[name]["embed_dims"]]
    return MixVisionTransformerEncoder(**params)


class _Former(_ParamGroupsMixin, nn.Module):
    """A hierarchical encoder (MiT by default, via smp) plus all-MLP decoders built by subclasses.

    ``dropout`` reaches the whole network: the decoders' ``Dropout2d`` and every dropout layer
    of the encoder (``set_encoder_dropout``: MiT's attention, projection and MLP dropout), so
    MC dropout samples the encoder too (EMUFormer §4).
    """

    def __init__(self, encoder: str, dropout: float, pretrained: bool,
                 weights_path: str | os.PathLike | None, decoder_dim: int | None):
        super().__init__()
        if encoder not in SMALL_MIT:
            _check_encoder(encoder)
        elif pretrained:
            raise ValueError(f"{encoder!r} is a MiT shrunk for quick mode (models.SMALL_MIT); no "
                             "ImageNet weights exist for it. Pass pretrained=False, or use "
                             "'mit_b0'..'mit_b5' (EMUFormer: 'mit_b2') for pre-trained weights.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
        try:
            self.encoder = _mit_encoder(encoder)
        except (ValueError, KeyError) as err:
            raise ValueError(f"cannot build encoder {encoder!r}: {err}") from err
        _init_encoder(self.encoder, encoder, pretrained, weights_path)
        set_encoder_dropout(self.encoder, dropout)
        self.stage_channels = list(self.encoder.out_channels[-4:])
        big = encoder.startswith("mit_b") and encoder not in ("mit_b0", "mit_b1")
        self.decoder_dim = decoder_dim or (768 if big else 256)
        self.dropout = dropout
        self.output_stride = int(self.encoder.output_stride)
        self.name = f"{type(self).__name__}-{encoder}"

    def _decoder(self, out_channels: int) -> AllMLPDecoder:
        return AllMLPDecoder(self.stage_channels, self.decoder_dim, out_channels, self.dropout)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Validated input -> the four stage features (strides 4, 8, 16, 32)."""
        check_input(x, self.output_stride, self.name)
        return self.encoder(x)[-4:]


class SegFormer(_Former):
    """Single-task SegFormer: shared-style MiT encoder and an all-MLP segmentation decoder.

    Args:
        encoder: "mit_b0".."mit_b5" (EMUFormer uses mit_b2) or another smp encoder name.
        num_classes: output classes.
        dropout: dropout rate of the decoder and of every encoder dropout layer (for MC
            dropout; EMUFormer compares 0.2 and 0.5; see ``set_encoder_dropout``).
        pretrained: ImageNet encoder weights (see ``build_segmenter``).
        weights_path: local encoder state dict instead of the hub.
        decoder_dim: decoder embedding dim; default 256 for mit_b0/b1 and other encoders, 768
            for mit_b2..b5 (SegFormer paper).

    References:
        Xie et al. 2021; EMUFormer (Landgraf et al. 2024), §3.2.1, Fig. 1, Table 1. Taught in
        notebook 04 (EMUFormer).
    """

    def __init__(self, encoder: str = "mit_b0", num_classes: int | None = None,
                 dropout: float = 0.0, pretrained: bool = False,
                 weights_path: str | os.PathLike | None = None, decoder_dim: int | None = None):
        _check_num_classes(num_classes, type(self).__name__)
        super().__init__(encoder, dropout, pretrained, weights_path, decoder_dim)
        self.seg_decoder = self._decoder(num_classes)
        self.segmentation_head = self.seg_decoder.head

    def forward_features(self, x: Tensor) -> Tensor:
        """Fused decoder features at 1/4 of the input size."""
        return self.seg_decoder.forward_features(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, H, W]`` (bilinear upsampling from 1/4)."""
        return _upsample(self.segmentation_head(self.forward_features(x)), x)


class DepthFormer(_Former):
    """Single-task DepthFormer: MiT encoder and an all-MLP depth decoder with two channels.

    Channel 0 through a ReLU is the depth mean, channel 1 through a Softplus the variance.
    Arguments as ``SegFormer`` without ``num_classes``.

    References:
        EMUFormer (Landgraf et al. 2024), §3.2.2, Eqs. 4-5, Fig. 2. Taught in notebook 04.
    """

    def __init__(self, encoder: str = "mit_b0", dropout: float = 0.0, pretrained: bool = False,
                 weights_path: str | os.PathLike | None = None, decoder_dim: int | None = None):
        super().__init__(encoder, dropout, pretrained, weights_path, decoder_dim)
        self.depth_decoder = self._decoder(2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"depth": [B, H, W] >= 0, "depth_var": [B, H, W] > 0}``."""
        return _depth_outputs(self.depth_decoder(self.encode(x)), x)


class SegDepthFormer(SegFormer):
    """SegDepthFormer (the EMUFormer student): one shared encoder, a segmentation and a depth decoder.

    Arguments as ``SegFormer``. The two decoders are independent all-MLP decoders of the same
    width; for mit_b2 that makes 30.5M parameters, as in EMUFormer Table 1.

    References:
        EMUFormer (Landgraf et al. 2024), §3.2.3, Fig. 3, Table 1. Taught in notebook 04.
    """

    def __init__(self, encoder: str = "mit_b0", num_classes: int | None = None,
                 dropout: float = 0.0, pretrained: bool = False,
                 weights_path: str | os.PathLike | None = None, decoder_dim: int | None = None):
        super().__init__(encoder, num_classes, dropout, pretrained, weights_path, decoder_dim)
        self.depth_decoder = self._decoder(2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"logits": [B, C, H, W], "depth": [B, H, W], "depth_var": [B, H, W]}``."""
        features = self.encode(x)
        logits = _upsample(self.seg_decoder(features), x)
        return {"logits": logits, **_depth_outputs(self.depth_decoder(features), x)}


class FormerTrunk(nn.Module):
    """The shared MiT encoder of a Former as a module: ``x -> [4 stage features]``."""

    def __init__(self, former: _Former):
        super().__init__()
        self.encoder, self.output_stride, self.name = former.encoder, former.output_stride, former.name

    def forward(self, x: Tensor) -> list[Tensor]:
        check_input(x, self.output_stride, self.name)
        return self.encoder(x)[-4:]


class SegDepthHead(nn.Module):
    """SegDepthFormer's two all-MLP decoders as one head on the encoder's stage features.

    ``forward(features)`` returns ``{"logits", "depth", "depth_var"}`` at 4x the finest stage
    (the input size: MiT's finest stage has stride 4), as ``SegDepthFormer`` does.
    """

    def __init__(self, stage_channels: list[int], dim: int, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        self.seg_decoder = AllMLPDecoder(stage_channels, dim, num_classes, dropout)
        self.depth_decoder = AllMLPDecoder(stage_channels, dim, 2, dropout)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        size = tuple(4 * n for n in features[0].shape[-2:])
        return {"logits": _upsample(self.seg_decoder(features), size),
                **_depth_outputs(self.depth_decoder(features), size)}


def segdepthformer_sub_ensemble(encoder: str = "mit_b0", num_classes: int | None = None,
                                n_heads: int = 10, dropout: float = 0.0,
                                pretrained: bool = False, decoder_dim: int | None = None,
                                weights_path: str | os.PathLike | None = None) -> nn.Module:
    """A deep sub-ensemble of SegDepthFormer: one MiT encoder, ``n_heads`` pairs of decoders.

    Each head is a segmentation and a depth all-MLP decoder (``SegDepthHead``), independently
    initialised; in training one head per batch is updated, in turn (``ensembles.
    DeepSubEnsemble``). Arguments as ``SegDepthFormer`` plus ``n_heads`` (EMUFormer: 10).

    References:
        Valdenegro-Toro 2023; EMUFormer (Landgraf et al. 2024) §4 "Deep Sub-Ensemble", Tables
        2-3. Taught in notebooks/04_emuformer.ipynb.
    """
    from minikd.ensembles import DeepSubEnsemble

    base = SegDepthFormer(encoder, num_classes, dropout, pretrained, weights_path, decoder_dim)
    return DeepSubEnsemble(FormerTrunk(base), lambda: SegDepthHead(
        base.stage_channels, base.decoder_dim, num_classes, dropout), n_heads)


# --------------------------------------------------------------------------- small helpers
def as_dict(out: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A model output as a dict: a bare logits tensor becomes ``{"logits": out}``.

    Args:
        out: a model's output (Tensor or dict).

    Returns:
        The dict (the same object when ``out`` is already a dict).
    """
    if isinstance(out, Tensor):
        return {"logits": out}
    if isinstance(out, dict):
        return out
    raise ValueError(f"expected a Tensor or a dict of tensors from the model; got {type(out)}. "
                     "smp models with aux_params return (masks, labels): drop aux_params.")




# --------------------------------------------------------------------------- Holder & Shafique
class ClassWiseUncertaintyStudent(DUDESStudent):
    """A DUDES-like student whose uncertainty head predicts one std per *class* (C channels).

    This is the target of Holder & Shafique (2021) that DUDES simplifies: instead of the std of
    the predicted class only (one channel), the student learns the teacher's whole class-wise
    standard-deviation map ``[C, H, W]`` (DUDES §5). The head is a freshly initialised copy of
    the segmentation head (C output channels) followed by a sigmoid, sharing the decoder, so it
    adds ``C`` times the parameters of the DUDES head (4,883 for DeepLabV3+ ResNet18 with 19
    classes). Everything else (decoder, training, loss form) stays as in DUDES, which makes the
    comparison "what is distilled" only; Holder & Shafique's own heads and extra losses are not
    reproduced.

    Args:
        segmenter: as for ``DUDESStudent`` (anything with ``forward_features`` and
            ``segmentation_head``).

    Returns (forward):
        ``{"logits": [B, C, H, W], "class_uncertainty": [B, C, H, W] in [0, 1],
        "uncertainty": [B, H, W]}``, the last being the class-wise map read at the predicted
        class (argmax of the logits), i.e. the quantity DUDES distils, so every metric written
        for a DUDES student applies unchanged.

    References:
        Holder & Shafique, "Efficient Uncertainty Estimation in Semantic Segmentation via
        Distillation", ICCVW 2021; Landgraf et al., DUDES (2023) §5. Taught in
        notebooks/03_dudes.ipynb (ablation).
    """

    def _make_uncertainty_head(self, segmentation_head: nn.Module) -> nn.Module:
        head = copy.deepcopy(segmentation_head)
        for m in head.modules():  # same layout as the segmentation head, fresh weights
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return nn.Sequential(head, nn.Sigmoid())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits, the class-wise uncertainty map and its value at the predicted class."""
        logits, class_unc = self._heads(x)
        pred = logits.detach().max(1, keepdim=True).indices  # = argmax, faster on a CPU
        return {"logits": logits, "class_uncertainty": class_unc,
                "uncertainty": class_unc.gather(1, pred)[:, 0]}


# --------------------------------------------------------------------------- light U-Net teachers
def light_unet(encoder: str, num_classes: int, encoder_depth: int = 3,
               decoder_channels: tuple[int, ...] = (32, 16, 8)) -> Segmenter:
    """A U-Net with a short encoder and a thin decoder: a CPU stand-in for an encoder teacher.

    The U-Net KD paper's teachers are U-Nets whose encoder is VGG16, ResNet50 or MobileNetV2
    (``build_segmenter("Unet", ...)``, 7-33 M parameters). On a laptop CPU they are too slow to
    train in a quick lesson, so quick mode keeps their *families* but shrinks them: e.g.
    ``"tu-repvgg_a0"`` (a VGG-style plain 3x3 network), ``"tu-resnet10t"`` (a 10-layer ResNet),
    ``"tu-mobilenetv2_050"`` (MobileNetV2 at half width), only the first ``encoder_depth``
    stages, and a decoder of ``decoder_channels``. Randomly initialised (no download).

    Prefer timm names (``"tu-..."``): timm builds only the stages used, so
    ``count_parameters`` is honest; smp's own encoders (``"resnet50"``) keep every stage's
    parameters even when ``encoder_depth`` < 5.

    Args:
        encoder: an smp encoder name, e.g. ``"tu-resnet10t"``.
        num_classes: output channels.
        encoder_depth: encoder stages used (3-5); the output stride is ``2**encoder_depth``.
        decoder_channels: one entry per stage, from the deepest to the finest.

    Returns:
        A ``Segmenter`` (input validation, ``forward_features``, ``param_groups``).

    Raises:
        ValueError: unknown encoder, or ``len(decoder_channels) != encoder_depth``.

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-B and Table III.
        Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    _check_num_classes(num_classes, "light_unet")
    decoder_channels = tuple(int(c) for c in decoder_channels)
    if not 3 <= encoder_depth <= 5 or len(decoder_channels) != encoder_depth:
        raise ValueError(f"encoder_depth={encoder_depth} with decoder_channels={decoder_channels}"
                         "; expected a depth in 3..5 and one decoder width per stage, e.g. "
                         "encoder_depth=3, decoder_channels=(32, 16, 8).")
    try:
        model = smp.Unet(encoder_name=encoder, encoder_weights=None, encoder_depth=encoder_depth,
                         decoder_channels=decoder_channels, classes=num_classes)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"light_unet cannot build encoder {encoder!r}: {err} Use an smp encoder "
                         "name or a timm one with the 'tu-' prefix, e.g. 'tu-resnet10t'.") from err
    return Segmenter(model, name=f"Unet-{encoder}-d{encoder_depth}")


# --------------------------------------------------------------------------- the model zoo
#: The zoo: trained ToyCity models shipped inside the package (float16 state dicts, one manifest).
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
ZOO_MANIFEST = ZOO_DIR / "manifest.json"
_ZOO_FORMAT = "minikd-zoo-1"
#: The model constructors a manifest entry may name as its ``builder``.
ZOO_BUILDERS = ("unet_family", "UNet", "light_unet", "build_segmenter", "DUDESStudent",
                "SegFormer", "DepthFormer", "SegDepthFormer", "segdepthformer_sub_ensemble",
                "pspnet")


class ZooError(RuntimeError):
    """A zoo file that is missing, corrupted or does not match the manifest."""


def zoo_manifest(path: str | os.PathLike | None = None) -> dict:
    """The zoo manifest: ``{"format", "validation", "entries": {name: entry}}``.

    Each entry records the builder and its arguments, the training recipe, the command that
    trained it, its time and machine, its validation figures and curve, and the sha256 of its
    weights file (see ``minikd/zoo/README.md``).
    """
    path = Path(path or ZOO_MANIFEST)
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _ZOO_FORMAT:
        raise ZooError(f"{path} is not a minikd zoo manifest (format {manifest.get('format')!r}, "
                       f"expected {_ZOO_FORMAT!r}).")
    return manifest


def zoo_entry(name: str, manifest: dict | None = None) -> dict:
    """The manifest entry of ``name``; ValueError listing the available names if unknown."""
    entries = (manifest or zoo_manifest())["entries"]
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"no zoo model named {name!r}; available: {sorted(entries)}.{hint}")
    return entries[name]


def build_from_entry(entry: dict) -> nn.Module:
    """A fresh (untrained) model from an entry's ``builder`` (a function of this module) and
    ``args``."""
    if entry["builder"] not in ZOO_BUILDERS:
        raise ZooError(f"zoo builder {entry['builder']!r} is not one of {list(ZOO_BUILDERS)}.")
    return globals()[entry["builder"]](**entry["args"])


def retrain_command(name: str) -> str:
    """The command that retrains zoo entry ``name`` and rewrites its manifest entry (the name
    quoted for a POSIX shell where it needs it, e.g. ``'toycity/M1024*'``)."""
    import shlex

    return f"python -m minikd.training zoo --train {shlex.quote(name)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_zoo_weights(model: nn.Module, path: str | os.PathLike, sha256: str | None,
                     name: str) -> nn.Module:
    """Load a float16 zoo state dict into ``model`` (float32), after checking its sha256.

    Raises:
        ZooError: the file is missing, its checksum differs, or it is not a readable state dict
            that fits the model; the message names the file and the command that retrains it.
    """
    path = Path(path)
    again = f"Retrain it with `{retrain_command(name)}` (or reinstall minikd)."
    if not path.is_file():
        raise ZooError(f"zoo weights {path} for {name!r} are missing. {again}")
    actual = _sha256(path) if sha256 is not None else None
    if actual != sha256:
        raise ZooError(f"zoo weights {path} for {name!r} do not match the manifest's sha256 "
                       f"(expected {sha256[:12]}..., got {actual[:12]}...): the file is "
                       f"corrupted, truncated or stale. {again}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises almost anything
        raise ZooError(f"zoo weights {path} for {name!r} are not a readable state dict of this "
                       f"model ({type(e).__name__} while loading). {again}") from None
    return model


def pretrained(name: str) -> nn.Module:
    """A trained ToyCity model from the zoo shipped with minikd, in eval mode, on the CPU.

    The weights are checked against the manifest's sha256 and loaded with
    ``torch.load(weights_only=True)`` (stored as float16, loaded into float32). The entry (its
    recipe, validation figures and curve) is ``zoo_entry(name)``; ``training.load_or_train``
    is the same with the option to retrain. ``python -m minikd.training zoo --list`` lists them.

    Args:
        name: e.g. ``"toycity/M256"``.

    Raises:
        ValueError: unknown name (the message lists the available ones).
        ZooError: the file is missing or corrupted (the message says how to retrain it).

    References:
        Taught in notebooks/01_vanilla_kd_temperature.ipynb (the teacher comes from here).
    """
    entry = zoo_entry(name)
    if "sha256" not in entry:
        raise ZooError(f"zoo entry {name!r} has not been trained yet (no sha256 in "
                       f"{ZOO_MANIFEST}); train it with `{retrain_command(name)}`.")
    model = build_from_entry(entry)
    load_zoo_weights(model, ZOO_DIR / entry["file"], entry["sha256"], name)
    return model.eval()


TEACHERS_FILE = "teachers.json"


def load_teachers(folder: str | os.PathLike) -> dict[str, nn.Module]:
    """User-supplied teacher checkpoints (full mode of notebook 05), in eval mode on the CPU.

    ``folder`` holds the weights files and a ``teachers.json`` that says how to build each
    network, with the zoo's ``builder``/``args`` convention::

        {"teachers": {
            "DACS": {"builder": "build_segmenter", "file": "dacs.pt",
                     "args": {"arch": "DeepLabV3Plus", "encoder": "resnet101",
                              "num_classes": 19}},
            "CBST": {...}, "SourceOnly": {...}}}

    Each file is a state dict (or a dict holding one under ``"model"`` or ``"state_dict"``, as
    ``training.fit``'s checkpoints do), loaded with ``torch.load(weights_only=True)``.

    Returns:
        ``{name: model}`` in the file's order.

    Raises:
        FileNotFoundError: no folder, no teachers.json or a missing weights file (the message
            shows the expected layout).
        ValueError: an entry without ``builder``/``args``/``file``, or weights that do not fit.

    References:
        Chao et al., CVPRW 2021 (teachers trained by external UDA code bases). Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    folder = Path(folder)
    spec_path = folder / TEACHERS_FILE
    layout = (f"expected {folder}/{TEACHERS_FILE} naming each teacher's builder, args and "
              "weights file (see minikd.models.load_teachers)")
    if not spec_path.is_file():
        raise FileNotFoundError(f"no {spec_path}; {layout}.")
    teachers = json.loads(spec_path.read_text()).get("teachers") or {}
    if not teachers:
        raise ValueError(f"{spec_path} lists no teachers; {layout}.")
    out = {}
    for name, entry in teachers.items():
        missing = {"builder", "args", "file"} - set(entry)
        if missing:
            raise ValueError(f"teacher {name!r} in {spec_path} lacks {sorted(missing)}; {layout}.")
        path = folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"teacher {name!r}: weights {path} are missing; {layout}.")
        model = build_from_entry(entry)
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"teacher {name!r}: {path} does not fit {entry['builder']}"
                             f"({entry['args']}): {str(e).splitlines()[0]}") from None
        out[name] = model.eval()
    return out

"""DeepLabV3+ with a deep-stem ResNet backbone, as used by PCR (docs/METHOD.md section 2).

    x (B,3,H,W) -> backbone -> layer1 (stride 4), layer3, layer4 (stride 8 or 16)
    ASPP(layer4) -> 3x3 conv 256 -> upsample to layer1 size ----+
    layer1 -> 1x1 conv 256 ------------------------------------ cat -> feature f (B,512,H/4,W/4)
    f -> linear head (3x3, 3x3, 1x1) -> logits (B,K,H/4,W/4)
    layer3 -> aux head (optional) -> aux_logits (B,K,stride of layer3)

Every conv that feeds a BatchNorm has no bias (the BN shift makes it redundant and its
gradient would be zero, which looks like a dead parameter to DDP). Dropout is channel-wise
(nn.Dropout2d), as in the U2PL decoder PCR was built on.

The backbone's state_dict keys follow the deep-stem ImageNet checkpoints distributed with
prior semi-supervised segmentation work (`resnet101.pth`); with deep_stem=False they
follow torchvision's resnet so that torchvision's ImageNet weights load.

The interface the trainer, evaluator and prototype bank rely on (a new backbone or decoder must keep it):
    model(x) -> (logits, feature, aux_logits), each at its native stride (the callers upsample, bilinear
                with align_corners=True); aux_logits is None without an aux head
    model.feature_dim  channels of `feature`, the dimension of the prototypes (512)
    model.backbone     the ImageNet-initialised part: param_groups gives it the base lr, the rest the head lr
    model.num_classes  K
A new ResNet depth is one entry in BACKBONES; train.py and bench.py take their --backbone choices from it.

Imports only torch and torchvision, so the file can be copied into another project on its
own. Usage (tests/test_copyable.py runs it on this file alone; random init, tiny width):

    >>> import torch
    >>> from model import build_model, param_groups
    >>> model = build_model(num_classes=5, backbone="resnet18", output_stride=8, aux=True,
    ...                     width=0.125).eval()
    >>> with torch.no_grad():
    ...     logits, feature, aux_logits = model(torch.randn(1, 3, 33, 33))
    >>> tuple(logits.shape), tuple(feature.shape), tuple(aux_logits.shape)
    ((1, 5, 9, 9), (1, 64, 9, 9), (1, 5, 5, 5))
    >>> [group["name"] for group in param_groups(model, lr=0.01, head_lr=0.1)]
    ['backbone', 'head']
"""

import os
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BACKBONES = {
    # name: (block type, blocks per layer)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
MULTI_GRID = (1, 2, 4)  # layer4 block dilations at OS8 are 4 x this grid (cycled)
ASPP_DILATIONS = {8: (12, 24, 36), 16: (6, 12, 18)}


def conv3x3(in_channels, out_channels, stride=1, dilation=1):
    """3x3 conv without bias whose padding keeps the size (up to the stride)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and the residual. Unlike torchvision's BasicBlock, dilation > 1 is allowed (both
    convs are dilated), so resnet18/34 can run at output stride 8 or 16."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) and the residual; the stride sits on the 3x3 conv2
    (torchvision / "ResNet v1.5", also the field's layout)."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@contextmanager
def buffers_untouched(modules):
    """Inside, the buffers of `modules` (BN running statistics, num_batches_tracked) are
    throwaway copies: whatever the code inside writes to them is dropped on the way out."""
    buffers = [(owner, name, buffer) for module in modules for owner in module.modules()
               for name, buffer in owner.named_buffers(recurse=False)]
    for owner, name, buffer in buffers:
        setattr(owner, name, buffer.clone())
    try:
        yield
    finally:
        for owner, name, buffer in buffers:
            setattr(owner, name, buffer)


def applied(x, *modules):
    """The modules applied to x in turn."""
    for module in modules:
        x = module(x)
    return x


def recomputed(x, *modules):
    """applied(x, *modules), keeping only x for the backward pass, which applies the modules again to
    recompute their activations (torch.utils.checkpoint, non-reentrant: autocast and dropout's random draws
    are replayed). BN in train mode normalises with the batch's statistics, so the recomputation gives the
    same output, but it would update the running statistics a second time: it runs under buffers_untouched."""
    return checkpoint(applied, x, *modules, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), buffers_untouched(modules)))


def layer_dilations(num_blocks, output_stride):
    """(stride of the first block, dilation of each block) for layer2, layer3, layer4.

    OS8:  layer3 stride 1, dilations (1, 2, 2, ...); layer4 stride 1, multi-grid
          4 x (1, 2, 4) cycled over its blocks -> (4, 8, 16) for three blocks.
    OS16: layer3 strided as usual; layer4 stride 1, dilations (1, 2, 2, ...), as
          torchvision's replace_stride_with_dilation=[False, False, True].
    Outside multi-grid, the first block of a dilated layer keeps the previous dilation:
    it replaces the strided conv, whose input still had the previous spacing."""
    _, n2, n3, n4 = num_blocks
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 (--output-stride), got {output_stride}")
    if output_stride == 8:
        multi_grid = [4 * MULTI_GRID[i % len(MULTI_GRID)] for i in range(n4)]
        return (2, [1] * n2), (1, [1] + [2] * (n3 - 1)), (1, multi_grid)
    return (2, [1] * n2), (2, [1] * n3), (1, [1] + [2] * (n4 - 1))


class ResNet(nn.Module):
    """ResNet feature extractor (no fc). forward(x) -> [layer1, layer2, layer3, layer4].

    deep_stem=True : conv1 = Sequential(conv 3->64 s2, BN, ReLU, conv 64->64, BN, ReLU,
                     conv 64->128), then bn1 + ReLU; 128 channels enter layer1.
    deep_stem=False: conv1 = 7x7 conv 3->64 s2 (torchvision), bn1 + ReLU; 64 channels.
    Both: max-pool 3x3 s2 pad 1 with ceil_mode=True, so an H x W image gives
    layer1 maps of size ceil(ceil(H/2)/2) for odd sizes too (65 -> 33 -> 17)."""

    def __init__(self, backbone="resnet101", output_stride=8, deep_stem=True, width=1.0):
        super().__init__()
        c = lambda channels: scaled(channels, width)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (--backbone); choose one of {sorted(BACKBONES)}")
        block_name, num_blocks = BACKBONES[backbone]
        block = BasicBlock if block_name == "basic" else Bottleneck
        layer2, layer3, layer4 = layer_dilations(num_blocks, output_stride)

        if deep_stem:
            self.conv1 = nn.Sequential(
                conv3x3(3, c(64), stride=2), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                conv3x3(c(64), c(64)), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                conv3x3(c(64), c(128)))
            stem_channels = c(128)
        else:
            self.conv1 = nn.Conv2d(3, c(64), 7, stride=2, padding=3, bias=False)
            stem_channels = c(64)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)

        self.in_channels = stem_channels
        self.layer1 = self._make_layer(block, c(64), 1, [1] * num_blocks[0])
        self.layer2 = self._make_layer(block, c(128), *layer2)
        self.layer3 = self._make_layer(block, c(256), *layer3)
        self.layer4 = self._make_layer(block, c(512), *layer4)
        # channels of layer1 / layer3 / layer4 outputs, for the decoder and aux head
        self.channels = tuple(c(n) * block.expansion for n in (64, 256, 512))

    def _make_layer(self, block, planes, stride, dilations):
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(self.in_channels, out_channels, stride),
                                       nn.BatchNorm2d(out_channels))
        blocks = [block(self.in_channels, planes, stride, dilations[0], downsample)]
        blocks += [block(out_channels, planes, 1, d) for d in dilations[1:]]
        self.in_channels = out_channels
        return nn.Sequential(*blocks)

    def forward(self, x, checkpointed=False):
        """checkpointed: the stem's and every residual block's activations are recomputed in
        the backward pass (`recomputed`); only their inputs are kept."""
        run = recomputed if checkpointed else applied
        x = run(x, self.conv1, self.bn1, self.relu, self.maxpool)
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = run(x, block)
            outputs.append(x)
        return outputs


def scaled(channels, width):
    """Channel count times the width multiplier (1.0 = the published network)."""
    return max(8, int(round(channels * width)))


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: cat of five 256-channel branches (1280 channels).

    Branches: 1x1 conv; three 3x3 convs with the given dilations; image pooling (global average -> 1x1 conv ->
    BN -> ReLU, broadcast back to the map size). The pooling branch's BN sees one value per image and channel,
    so in train mode it needs a batch of at least 2 images (eval mode works with batch 1)."""

    def __init__(self, in_channels, dilations, channels=256):
        super().__init__()
        self.pool_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels))
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels)]
            + [conv_bn_relu(in_channels, channels, 3, d) for d in dilations])
        self.out_channels = channels * (len(dilations) + 2)

    def forward(self, x):
        # Checked only for plain BN: after conversion, SyncBatchNorm pools the statistics
        # over all processes, where one image per process is fine.
        pool_norm = self.pool_branch[1][1]
        if self.training and x.shape[0] == 1 and isinstance(pool_norm, nn.BatchNorm2d):
            raise ValueError("ASPP image pooling: BatchNorm in train mode needs a batch of at least 2 images "
                             "per process; got 1 (use a larger batch or model.eval())")
        pooled = F.interpolate(self.pool_branch(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=True)  # (B,256,1,1) -> (B,256,h,w)
        return torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ of the module docstring's diagram, returning (logits, feature, aux_logits), all at their
    native stride: logits and feature f at stride 4, aux_logits at layer3's (8 at OS8, 16 at OS16).
    checkpoint_activations (attribute, default False): a forward in train mode with gradients
    recomputes the backbone's stem and residual blocks in the backward pass: less memory,
    more time, the same numbers (no-grad and eval passes, such as a teacher's, never do)."""

    def __init__(self, num_classes, backbone="resnet101", output_stride=8, aux=False,
                 deep_stem=True, dropout=0.1, width=1.0):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes (--num-classes) must be a positive integer, got {num_classes!r}")
        # width < 1 thins every layer alike: a cheap network for toy runs and tests
        self.backbone = ResNet(backbone, output_stride, deep_stem, width)
        layer1_channels, layer3_channels, layer4_channels = self.backbone.channels
        channels = scaled(256, width)
        self.feature_dim = 2 * channels  # 512 at width 1

        self.aspp = ASPP(layer4_channels, ASPP_DILATIONS[output_stride], channels)
        self.aspp_project = nn.Sequential(conv_bn_relu(self.aspp.out_channels, channels, 3),
                                          nn.Dropout2d(dropout))
        self.low_level = conv_bn_relu(layer1_channels, channels)
        self.classifier = nn.Sequential(
            conv_bn_relu(self.feature_dim, channels, 3), nn.Dropout2d(dropout),
            conv_bn_relu(channels, channels, 3), nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1))
        self.aux_classifier = nn.Sequential(
            conv_bn_relu(layer3_channels, channels, 3), nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1)) if aux else None
        self.num_classes = num_classes
        self.checkpoint_activations = False

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV3Plus expects images of shape (B,3,H,W), got {tuple(x.shape)}")
        checkpointed = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        # ASPP and decoder are not recomputed: their activations are the last made and the
        # first freed, so recomputing them barely lowers the peak (resnet101, crop 257, 4
        # images, fp32: 884 -> 799 MiB; none recomputed: 2273) for 35% of the forward's FLOPs.
        layer1, _, layer3, layer4 = self.backbone(x, checkpointed)
        context = self.aspp_project(self.aspp(layer4))  # (B,256,h8,w8) or h16
        context = F.interpolate(context, size=layer1.shape[-2:], mode="bilinear",
                                align_corners=True)  # (B,256,h4,w4)
        feature = torch.cat([self.low_level(layer1), context], dim=1)  # (B,512,h4,w4)
        logits = self.classifier(feature)  # (B,K,h4,w4)
        aux_logits = None if self.aux_classifier is None else self.aux_classifier(layer3)
        return logits, feature, aux_logits


def _load_checked(backbone, state_dict, source):
    """Copy state_dict into backbone after checking keys and shapes; fc.* is ignored, and
    num_batches_tracked may be absent (old checkpoints; a counter, not a weight). ValueError
    naming `source` and listing the missing, unexpected and mis-shaped keys."""
    expected = backbone.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} expected {list(expected[k].shape)} found {list(getattr(v, 'shape', ()))}"
                 for k, v in given.items() if k in expected
                 and (not torch.is_tensor(v) or v.shape != expected[k].shape)]
    if missing or unexpected or misshaped:
        lines = [f"{source}: checkpoint does not match the backbone"]
        deep_stem_model = "conv1.0.weight" in expected
        if deep_stem_model and "conv1.weight" in given:
            lines.append("  it looks like a torchvision 7x7-stem checkpoint but the model has the deep stem "
                         "(use --pretrained torchvision, or a deep-stem resnet*.pth)")
        elif not deep_stem_model and "conv1.0.weight" in given:
            lines.append("  it looks like a deep-stem checkpoint but the model has the "
                         "torchvision 7x7 stem (build it with deep_stem=True)")
        lines += [f"  {what} keys ({len(keys)}): " + ", ".join(keys) for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise ValueError("\n".join(lines))
    backbone.load_state_dict(given, strict=False)  # only num_batches_tracked can be absent


def load_backbone_weights(backbone, path):
    """Load a deep-stem (or 7x7-stem) ImageNet checkpoint file into `backbone` in place: a plain
    state_dict or one stored under "state_dict" / "model", a leading "module." (DataParallel) stripped,
    fc.* (the classifier) ignored. FileNotFoundError if `path` does not exist; ValueError if torch
    cannot read it or its keys/shapes do not match (the message lists every offending key)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist (--pretrained "
                                f"takes none, torchvision or a checkpoint path)")
    if os.path.isdir(path):
        raise ValueError(f"pretrained checkpoint {path} is a directory, expected a file (--pretrained)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: report which one and why
        raise ValueError(f"{path}: torch.load could not read it as a weights-only "
                         f"checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), found {type(checkpoint).__name__}")
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
            break
    _load_checked(backbone, {k.removeprefix("module."): v for k, v in checkpoint.items()}, path)


# --pretrained hub:NAME -> (backbone, URL). timm's Gluon "v1s" ResNets (timm/models/resnet.py:
# stem_type='deep', stem_width=64, stride on the 3x3 conv, 1x1-conv downsample) have the
# field's deep-stem layout key for key: conv1.0/.1/.3/.4/.6, bn1 with 128 channels,
# layerN.M.{conv1..3, bn1..3, downsample.0/.1}, plus fc.* (ignored). The Hugging Face repos
# hold model.safetensors and pytorch_model.bin; the .bin is read with torch.load(weights_only).
HUB_WEIGHTS = {
    "resnet101s": ("resnet101", "https://huggingface.co/timm/resnet101s.gluon_in1k/resolve/main/"
                                "pytorch_model.bin"),
    "resnet50s": ("resnet50", "https://huggingface.co/timm/resnet50s.gluon_in1k/resolve/main/"
                              "pytorch_model.bin"),
}


def _download(url, path):
    """Fetch url to path (torch.hub writes a temporary file and renames it when complete)."""
    torch.hub.download_url_to_file(url, path, progress=True)


def hub_weights_path(name):
    """Where --pretrained hub:NAME is cached: torch's hub cache ($TORCH_HOME/hub, by default
    ~/.cache/torch/hub), checkpoints/timm_NAME.gluon_in1k.bin."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"timm_{name}.gluon_in1k.bin")


def download_failed(source, url, error, path):
    """The one-line ValueError of a failed download of --pretrained `source`: the URL, why
    (URLError and HTTPError are OSErrors with a reason), where to put the file by hand."""
    reason = " ".join(str(getattr(error, "reason", None) or error).split())
    return ValueError(f"--pretrained {source}: could not download {url} ({type(error).__name__}: "
                      f"{reason[:200]}); without network access, fetch that file on another "
                      f"machine and put it at {path}")


def fetch_hub_weights(name, backbone):
    """--pretrained hub:NAME -> local file: HUB_WEIGHTS[name] downloaded once into torch's hub
    cache (hub_weights_path). ValueError (one line) for an unknown name, a backbone that does
    not match, or a failed download (download_failed)."""
    if name not in HUB_WEIGHTS:
        raise ValueError(f"--pretrained hub:{name}: unknown; choose one of "
                         + ", ".join(f"hub:{key}" for key in HUB_WEIGHTS))
    weights_backbone, url = HUB_WEIGHTS[name]
    if backbone != weights_backbone:
        raise ValueError(f"--pretrained hub:{name} holds {weights_backbone} weights but --backbone is {backbone}")
    path = hub_weights_path(name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            _download(url, path)
        except (OSError, ValueError) as error:
            raise download_failed(f"hub:{name}", url, error, path) from None
    return path


def _torchvision_weights(backbone):
    """(weights enum, state_dict) of torchvision's default ImageNet weights for `backbone`
    (downloaded on first use into torch's hub cache; download_failed if that fails)."""
    from torchvision.models import get_model_weights  # here: importing torchvision takes seconds
    weights = get_model_weights(backbone).DEFAULT
    try:
        return weights, weights.get_state_dict(progress=True)
    except OSError as error:  # URLError, HTTPError, socket errors, disk full
        url = getattr(weights, "url", "?")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        raise download_failed("torchvision", url, error, path) from None


def build_model(num_classes, backbone="resnet101", output_stride=8, aux=False, pretrained="none", width=1.0):
    """DeepLabV3Plus with backbone weights chosen by `pretrained` (--pretrained):

    "none"        deep stem, random init (kaiming convs, BN weight 1 / bias 0);
    "torchvision" torchvision 7x7 stem with torchvision's default ImageNet weights
                  (downloaded by torchvision on first use);
    "hub:NAME"    deep stem, timm's Gluon v1s ImageNet weights from the Hugging Face hub
                  (HUB_WEIGHTS; downloaded once into torch's hub cache);
    a path        deep stem, weights from that checkpoint (load_backbone_weights).
    width scales every layer's channels; ImageNet weights exist for width 1 only."""
    if pretrained != "none" and width != 1.0:
        raise ValueError(f"--width {width}: pretrained weights (--pretrained {pretrained}) "
                         "exist only for width 1.0; pass --pretrained none")
    # Downloads come first: a failed one should not wait for a large model to be built.
    if pretrained == "torchvision":
        weights, state_dict = _torchvision_weights(backbone)
        model = DeepLabV3Plus(num_classes, backbone, output_stride, aux, deep_stem=False)
        _load_checked(model.backbone, state_dict, f"torchvision {backbone} weights {weights}")
        return model
    if pretrained.startswith("hub:"):
        pretrained = fetch_hub_weights(pretrained[len("hub:"):], backbone)
    model = DeepLabV3Plus(num_classes, backbone, output_stride, aux, deep_stem=True, width=width)
    if pretrained != "none":
        load_backbone_weights(model.backbone, pretrained)
    return model


def param_groups(model, lr, head_lr):
    """Optimizer groups: backbone at `lr`, everything else (ASPP, decoder, heads) at `head_lr`; a
    DistributedDataParallel / DataParallel wrapper is unwrapped first."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    backbone_params = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids]
    return [{"params": backbone_params, "lr": lr, "name": "backbone"},
            {"params": head_params, "lr": head_lr, "name": "head"}]

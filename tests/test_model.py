"""Tests for model.py: shapes, checkpoint layout, dilation conventions, loading, groups."""

import contextlib
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as model_module  # noqa: E402
from model import (DeepLabV3Plus, ResNet, build_model, load_backbone_weights,  # noqa: E402
                   param_groups)


def bn_keys(prefix, channels):
    shape = (channels,)
    return {f"{prefix}.weight": shape, f"{prefix}.bias": shape,
            f"{prefix}.running_mean": shape, f"{prefix}.running_var": shape,
            f"{prefix}.num_batches_tracked": ()}


def expected_deep_stem_bottleneck_keys(blocks_per_layer):
    """Key -> shape of the field's deep-stem checkpoint layout, written from its rules."""
    keys = {"conv1.0.weight": (64, 3, 3, 3), **bn_keys("conv1.1", 64),
            "conv1.3.weight": (64, 64, 3, 3), **bn_keys("conv1.4", 64),
            "conv1.6.weight": (128, 64, 3, 3), **bn_keys("bn1", 128)}
    in_channels = 128
    for layer, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_layer), 1):
        for block in range(num_blocks):
            p = f"layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (planes, in_channels, 1, 1)
            keys.update(bn_keys(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(bn_keys(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            keys.update(bn_keys(f"{p}.bn3", 4 * planes))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * planes, in_channels, 1, 1)
                keys.update(bn_keys(f"{p}.downsample.1", 4 * planes))
            in_channels = 4 * planes
    return keys


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def random_checkpoint(key_shapes, seed):
    """Random tensors with the given shapes, plus an ImageNet fc layer (to be ignored)."""
    generator = torch.Generator().manual_seed(seed)
    checkpoint = {}
    for key, shape in key_shapes.items():
        if key.endswith("num_batches_tracked"):
            checkpoint[key] = torch.tensor(12345)
        else:
            checkpoint[key] = torch.randn(shape, generator=generator)
    checkpoint["fc.weight"] = torch.randn(1000, 2048, generator=generator)
    checkpoint["fc.bias"] = torch.randn(1000, generator=generator)
    return checkpoint


# Hand-computed sizes: conv s2 (floor), max-pool s2 with ceil_mode, then s2 convs (floor).
# 65 -> 33 -> 17 | 9 | 5 ;  64 -> 32 -> 17 | 9 | 5 ;  50 -> 25 -> 13 | 7 | 4 ;
# 33 -> 17 -> 9 | 5 | 3
SIZES = [((65, 65), (17, 17), (9, 9), (5, 5)),
         ((64, 50), (17, 13), (9, 7), (5, 4))]


@pytest.mark.parametrize("backbone,output_stride,aux", [
    ("resnet18", 8, True), ("resnet18", 16, True), ("resnet18", 8, False),
    ("resnet34", 8, True), ("resnet34", 16, False)])
def test_output_shapes_small_backbones(backbone, output_stride, aux):
    torch.manual_seed(0)
    net = DeepLabV3Plus(6, backbone, output_stride, aux=aux).eval()
    for size, stride4, stride8, stride16 in SIZES:
        with torch.no_grad():
            logits, feature, aux_logits = net(torch.randn(1, 3, *size))
        assert logits.shape == (1, 6, *stride4)
        assert feature.shape == (1, 512, *stride4) and net.feature_dim == 512
        if aux:
            aux_size = stride8 if output_stride == 8 else stride16
            assert aux_logits.shape == (1, 6, *aux_size)
        else:
            assert aux_logits is None


@pytest.fixture(scope="module")
def resnet101_os8():
    torch.manual_seed(0)
    return DeepLabV3Plus(3, "resnet101", output_stride=8, aux=True).eval()


@pytest.mark.parametrize("backbone,output_stride", [("resnet50", 8), ("resnet50", 16),
                                                    ("resnet101", 8)])
def test_output_shapes_bottleneck_backbones(backbone, output_stride, resnet101_os8):
    torch.manual_seed(0)
    net = (resnet101_os8 if backbone == "resnet101"
           else DeepLabV3Plus(3, backbone, output_stride, aux=True).eval())
    with torch.no_grad():
        logits, feature, aux_logits = net(torch.randn(1, 3, 33, 33))
    assert logits.shape == (1, 3, 9, 9)
    assert feature.shape == (1, 512, 9, 9)
    assert aux_logits.shape == ((1, 3, 5, 5) if output_stride == 8 else (1, 3, 3, 3))


def test_deep_stem_resnet101_key_layout(resnet101_os8):
    backbone = resnet101_os8.backbone
    expected = expected_deep_stem_bottleneck_keys((3, 4, 23, 3))
    assert len(expected) == 636  # the distributed resnet101.pth has 636 backbone entries
    assert shapes(backbone.state_dict()) == expected
    assert list(backbone.state_dict()) == list(expected)  # same order as the checkpoint
    assert not any(k.startswith("fc.") for k in backbone.state_dict())


def test_deep_stem_resnet50_and_basic_block_layout():
    backbone = ResNet("resnet50", output_stride=16, deep_stem=True)
    assert shapes(backbone.state_dict()) == expected_deep_stem_bottleneck_keys((3, 4, 6, 3))
    # BasicBlock: 128 stem channels != 64, so layer1 block 0 needs a projection too
    keys = shapes(ResNet("resnet18", deep_stem=True).state_dict())
    assert keys["layer1.0.downsample.0.weight"] == (64, 128, 1, 1)
    assert keys["layer1.0.conv1.weight"] == (64, 128, 3, 3)
    assert keys["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert not any(k.startswith(f"layer{i}.1.downsample") for i in range(1, 5) for k in keys)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # one per block type
def test_torchvision_stem_matches_torchvision_layout(name):
    reference = torchvision.models.get_model(name, weights=None).state_dict()
    reference = {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}
    assert shapes(ResNet(name, output_stride=8, deep_stem=False).state_dict()) == reference


def dilations_and_strides(layer):
    """(dilation, stride) of each block's spatial conv (conv2 in Bottleneck, conv1 in Basic)."""
    result = []
    for block in layer:
        spatial = block.conv2 if hasattr(block, "conv3") else block.conv1
        result.append((spatial.dilation[0], spatial.stride[0]))
    return result


def test_dilations_output_stride_8_multigrid(resnet101_os8):
    backbone = resnet101_os8.backbone
    assert dilations_and_strides(backbone.layer2) == [(1, 2)] + [(1, 1)] * 3
    assert dilations_and_strides(backbone.layer3) == [(1, 1)] + [(2, 1)] * 22
    assert dilations_and_strides(backbone.layer4) == [(4, 1), (8, 1), (16, 1)]
    assert [b.conv2.padding[0] for b in backbone.layer4] == [4, 8, 16]
    assert backbone.layer3[0].downsample[0].stride == (1, 1)
    assert backbone.layer4[0].downsample[0].stride == (1, 1)
    # resnet18's layer4 has two blocks: the (4, 8, 16) grid is truncated; both convs dilated
    small = ResNet("resnet18", output_stride=8)
    assert dilations_and_strides(small.layer4) == [(4, 1), (8, 1)]
    assert [b.conv2.dilation[0] for b in small.layer4] == [4, 8]
    net = DeepLabV3Plus(2, "resnet18", output_stride=8)
    assert [b[0].dilation[0] for b in net.aspp.branches[1:]] == [12, 24, 36]


def test_dilations_output_stride_16():
    backbone = ResNet("resnet50", output_stride=16)
    assert dilations_and_strides(backbone.layer3) == [(1, 2)] + [(1, 1)] * 5
    assert dilations_and_strides(backbone.layer4) == [(1, 1), (2, 1), (2, 1)]
    net = DeepLabV3Plus(2, "resnet18", output_stride=16)
    assert [b[0].dilation[0] for b in net.aspp.branches[1:]] == [6, 12, 18]


def torchvision_features(reference, x):
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
    layer3 = reference.layer3(reference.layer2(reference.layer1(x)))
    return layer3, reference.layer4(layer3)


@pytest.mark.parametrize("output_stride,dilate", [(16, [False, False, True]),
                                                  (8, [False, True, True])])
def test_backbone_matches_torchvision_dilated_resnet(output_stride, dilate):
    """Same weights, same numbers as torchvision's replace_stride_with_dilation (65 px,
    where ceil and floor max-pooling agree). At OS8 only layer3 is comparable: torchvision
    has no multi-grid in layer4."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None,
                                            replace_stride_with_dilation=dilate).eval()
    for module in reference.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    ours = ResNet("resnet50", output_stride, deep_stem=False).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()
                          if not k.startswith("fc.")})
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        want_layer3, want_layer4 = torchvision_features(reference, x)
        _, _, layer3, layer4 = ours(x)
    torch.testing.assert_close(layer3, want_layer3)
    if output_stride == 16:
        torch.testing.assert_close(layer4, want_layer4)


def randomise_bn_buffers(module):
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("variant", ["plain", "module_prefix", "state_dict", "model"])
def test_load_checkpoint_roundtrip(tmp_path, variant):
    torch.manual_seed(1)
    source = DeepLabV3Plus(4, "resnet18").backbone
    randomise_bn_buffers(source)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    if variant == "module_prefix":
        state = {"module." + k: v for k, v in state.items()}
    elif variant in ("state_dict", "model"):
        state = {variant: state, "epoch": 90}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    target = DeepLabV3Plus(4, "resnet18")
    load_backbone_weights(target.backbone, str(path))
    loaded = target.backbone.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_build_model_loads_resnet101_checkpoint_layout(tmp_path):
    """A file with exactly the hand-written resnet101.pth layout (+ fc) loads completely."""
    checkpoint = random_checkpoint(expected_deep_stem_bottleneck_keys((3, 4, 23, 3)), seed=3)
    path = tmp_path / "resnet101.pth"
    torch.save(checkpoint, path)
    net = build_model(21, "resnet101", output_stride=8, pretrained=str(path))
    loaded = net.backbone.state_dict()
    assert set(loaded) | {"fc.weight", "fc.bias"} == set(checkpoint)
    for key, value in loaded.items():
        assert torch.equal(value, checkpoint[key]), key


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    source = ResNet("resnet18")
    randomise_bn_buffers(source)
    state = {k: v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    target = ResNet("resnet18")
    load_backbone_weights(target, tmp_path / "old.pth")
    assert torch.equal(target.layer2[1].bn2.running_var, source.layer2[1].bn2.running_var)


def save_resnet18_state(tmp_path, edit):
    state = dict(ResNet("resnet18").state_dict())
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return str(path)


def test_missing_key_is_listed(tmp_path):
    path = save_resnet18_state(tmp_path, lambda s: s.pop("layer2.1.bn2.weight"))
    with pytest.raises(ValueError) as error:
        load_backbone_weights(ResNet("resnet18"), path)
    message = str(error.value)
    assert path in message and "missing keys (1)" in message
    assert "layer2.1.bn2.weight" in message


def test_misshaped_and_unexpected_keys_are_listed(tmp_path):
    def edit(state):
        state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
        state["head.extra"] = torch.zeros(3)
    path = save_resnet18_state(tmp_path, edit)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(ResNet("resnet18"), path)
    message = str(error.value)
    assert "layer3.0.conv1.weight expected [256, 128, 3, 3] found [256, 128, 1, 1]" in message
    assert "unexpected keys (1): head.extra" in message
    assert "missing" not in message


def test_torchvision_checkpoint_into_deep_stem_says_so(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    target = ResNet("resnet18", deep_stem=True)
    before = target.conv1[0].weight.clone()
    with pytest.raises(ValueError) as error:
        load_backbone_weights(target, path)
    message = str(error.value)
    assert "torchvision 7x7" in message and "conv1.0.weight" in message
    assert "layer1.0.conv1.weight expected [64, 128, 3, 3] found [64, 64, 3, 3]" in message
    assert torch.equal(target.conv1[0].weight, before)  # nothing half-loaded


def test_unreadable_and_absent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(ResNet("resnet18"), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_backbone_weights(ResNet("resnet18"), garbage)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth.*expected a state_dict"):
        load_backbone_weights(ResNet("resnet18"), tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="torchvison"):
        build_model(3, "resnet18", pretrained="torchvison")


def test_build_model_torchvision_uses_weights_api(monkeypatch):
    """Offline stand-in for the download: the weights enum returns a known state_dict."""
    torch.manual_seed(4)
    reference = torchvision.models.resnet18(weights=None)
    randomise_bn_buffers(reference)
    requested = []

    class FakeWeights:
        def get_state_dict(self, progress=True):
            return reference.state_dict()

    class FakeEnum:
        DEFAULT = FakeWeights()

    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda name: requested.append(name) or FakeEnum)
    net = build_model(5, "resnet18", output_stride=16, pretrained="torchvision")
    assert requested == ["resnet18"]
    assert net.backbone.conv1.weight.shape == (64, 3, 7, 7)
    loaded = net.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


def test_param_groups_partition_parameters():
    net = DeepLabV3Plus(4, "resnet18", aux=True)
    for wrapped in (net, nn.DataParallel(net)):
        backbone_group, head_group = param_groups(wrapped, lr=0.001, head_lr=0.01)
        assert (backbone_group["name"], backbone_group["lr"]) == ("backbone", 0.001)
        assert (head_group["name"], head_group["lr"]) == ("head", 0.01)
        ids = [id(p) for p in backbone_group["params"] + head_group["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in net.parameters()}
        assert {id(p) for p in backbone_group["params"]} == {
            id(p) for p in net.backbone.parameters()}
        head_ids = {id(p) for p in head_group["params"]}
        for part in (net.aspp, net.aspp_project, net.low_level, net.classifier,
                     net.aux_classifier):
            assert all(id(p) in head_ids for p in part.parameters())


def test_gradient_reaches_every_parameter():
    torch.manual_seed(5)
    net = DeepLabV3Plus(3, "resnet18", output_stride=8, aux=True).train()
    logits, feature, aux_logits = net(torch.randn(2, 3, 33, 33))
    target = torch.randint(0, 3, (2, 9, 9))
    aux_target = torch.randint(0, 3, aux_logits.shape[:1] + aux_logits.shape[2:])
    loss = (F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux_logits, aux_target)
            + feature.square().mean())
    loss.backward()
    dead = [name for name, p in net.named_parameters()
            if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_batch_of_one():
    torch.manual_seed(6)
    net = DeepLabV3Plus(3, "resnet18").eval()
    with torch.no_grad():
        logits, _, _ = net(torch.randn(1, 3, 33, 33))
    assert logits.shape == (1, 3, 9, 9)
    with pytest.raises(ValueError, match="at least 2 images"):
        net.train()(torch.randn(1, 3, 33, 33))


def test_init_and_eval_determinism():
    torch.manual_seed(7)
    net = DeepLabV3Plus(3, "resnet18").eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        first, second = net(x)[0], net(x)[0]
    assert torch.equal(first, second)  # eval: dropout off, BN uses running statistics


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="--backbone"):
        DeepLabV3Plus(3, "resnet152")
    with pytest.raises(ValueError, match="--output-stride"):
        DeepLabV3Plus(3, "resnet18", output_stride=32)
    with pytest.raises(ValueError, match="--num-classes"):
        DeepLabV3Plus(0, "resnet18")
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        DeepLabV3Plus(3, "resnet18").eval()(torch.randn(1, 1, 33, 33))


# ---------------------------------------------------------------- activation checkpointing

@pytest.fixture
def checkpoints(monkeypatch):
    """The modules of every torch.utils.checkpoint call model.py makes, in call order."""
    calls, real = [], model_module.checkpoint

    def counted(function, x, *modules, **kwargs):
        calls.append(modules)
        return real(function, x, *modules, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counted)
    return calls


def forward_backward(net, x, checkpointed, amp=False):
    """Train-mode forward and backward of a copy of net: (outputs, input gradient,
    parameter gradients, buffers)."""
    net = copy.deepcopy(net)
    net.checkpoint_activations = checkpointed
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the decoder's dropout
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        outputs = net(x)
    sum(output.float().square().mean() for output in outputs).backward()
    return outputs, x.grad, dict((n, p.grad) for n, p in net.named_parameters()), dict(net.named_buffers())


def tiny_net_with_used_statistics(seed):
    """resnet18 at width 0.25 with an aux head, in train mode, its BN statistics moved away
    from their initial values (as after a few iterations)."""
    torch.manual_seed(seed)
    net = build_model(5, "resnet18", 8, aux=True, width=0.25).train()
    for name, buffer in net.named_buffers():
        buffer.copy_(torch.full_like(buffer, 3) if name.endswith("num_batches_tracked")
                     else torch.rand_like(buffer) + 0.5)
    return net


# resnet18: the stem and 8 residual blocks, one checkpoint each
CHECKPOINTS_PER_FORWARD = 9


@pytest.mark.parametrize("variant", ["fp32", "bf16", "syncbn", "cumulative"])
def test_checkpointed_activations_change_nothing_but_memory(variant, checkpoints):
    """Outputs, input and parameter gradients, BN running statistics and num_batches_tracked
    after a forward and backward with the backbone checkpointed are bit-identical to those
    without: with bf16 autocast, with SyncBatchNorm (train.py's CUDA conversion; without a
    process group it runs as plain BN) and with momentum=None (a cumulative average that
    reads num_batches_tracked)."""
    net = tiny_net_with_used_statistics(8)
    if variant == "syncbn":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if variant == "cumulative":
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
    x = torch.randn(2, 3, 49, 49)
    plain = forward_backward(net, x, False, amp=variant == "bf16")
    assert checkpoints == []
    recomputed = forward_backward(net, x, True, amp=variant == "bf16")
    assert len(checkpoints) == CHECKPOINTS_PER_FORWARD
    for a, b in zip(plain[0], recomputed[0]):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], recomputed[1])
    for kind, index in (("gradient", 2), ("buffer", 3)):
        assert plain[index].keys() == recomputed[index].keys()
        for name, value in plain[index].items():
            assert torch.equal(value, recomputed[index][name]), (kind, name)
    assert recomputed[3]["backbone.layer4.1.bn2.num_batches_tracked"] == 4  # 3 + this forward


def test_without_its_guard_the_recomputation_updates_bn_statistics_twice(monkeypatch):
    """The trap the test above closes is real: recomputed without buffers_untouched, every
    checkpointed BN counts the batch twice and moves its running statistics twice."""
    net = tiny_net_with_used_statistics(9)
    x = torch.randn(2, 3, 49, 49)
    plain = forward_backward(net, x, False)[3]
    monkeypatch.setattr(model_module, "buffers_untouched", lambda modules: contextlib.nullcontext())
    twice = forward_backward(net, x, True)[3]
    assert plain["backbone.layer4.1.bn2.num_batches_tracked"] == 4
    assert twice["backbone.layer4.1.bn2.num_batches_tracked"] == 5
    assert not torch.equal(plain["backbone.layer4.1.bn2.running_mean"],
                           twice["backbone.layer4.1.bn2.running_mean"])
    # the decoder is not checkpointed: counted once either way
    assert twice["classifier.0.1.num_batches_tracked"] == 4


def test_no_recomputation_without_a_backward_pass(checkpoints):
    """A teacher's pass (no gradients) and evaluation (eval mode) never checkpoint, so
    nothing is recomputed; a training forward checkpoints the stem and every block."""
    torch.manual_seed(10)
    net = build_model(5, "resnet18", 8, width=0.25).train()
    net.checkpoint_activations = True
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        net(x)
    net.eval()(x)
    assert checkpoints == []
    net.train()(x)
    assert len(checkpoints) == CHECKPOINTS_PER_FORWARD
    assert checkpoints[0] == (net.backbone.conv1, net.backbone.bn1, net.backbone.relu,
                              net.backbone.maxpool)
    assert [m for (m,) in checkpoints[1:]] == [*net.backbone.layer1, *net.backbone.layer2,
                                               *net.backbone.layer3, *net.backbone.layer4]


# ---------------------------------------------------------------- downloaded weights, offline

def test_hub_weights_download_once_into_torch_cache_and_load(tmp_path, monkeypatch):
    """hub:resnet50s with the download replaced by a file in the hand-written deep-stem
    layout (+ fc, as timm's files hold): cached under $TORCH_HOME/hub/checkpoints, loaded
    key for key, and not downloaded again."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoint = random_checkpoint(expected_deep_stem_bottleneck_keys((3, 4, 6, 3)), seed=5)
    fetched = []

    def fake_download(url, path):
        fetched.append(url)
        torch.save(checkpoint, path)

    monkeypatch.setattr(model_module, "_download", fake_download)
    net = build_model(3, "resnet50", output_stride=16, pretrained="hub:resnet50s")
    assert fetched == [model_module.HUB_WEIGHTS["resnet50s"][1]]
    assert fetched[0].startswith("https://huggingface.co/timm/resnet50s.gluon_in1k/")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "timm_resnet50s.gluon_in1k.bin"
    assert model_module.hub_weights_path("resnet50s") == str(cached) and cached.is_file()
    loaded = net.backbone.state_dict()
    assert set(loaded) | {"fc.weight", "fc.bias"} == set(checkpoint)
    for key, value in loaded.items():
        assert torch.equal(value, checkpoint[key]), key
    build_model(3, "resnet50", output_stride=16, pretrained="hub:resnet50s")
    assert len(fetched) == 1  # the cached file is used


def test_hub_weights_offline_and_bad_names_give_one_line_errors(tmp_path, monkeypatch):
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(model_module, "_download", no_network)
    with pytest.raises(ValueError) as error:
        build_model(21, "resnet101", pretrained="hub:resnet101s")
    message = str(error.value)
    assert "\n" not in message and "could not download" in message
    assert model_module.HUB_WEIGHTS["resnet101s"][1] in message
    assert "name resolution" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "timm_resnet101s.gluon_in1k.bin") \
        in message
    with pytest.raises(ValueError, match="hub:resnet50s holds resnet50 weights but --backbone "
                                         "is resnet101"):
        build_model(21, "resnet101", pretrained="hub:resnet50s")
    with pytest.raises(ValueError, match="hub:resnet18s: unknown; choose one of hub:resnet101s"):
        build_model(21, "resnet18", pretrained="hub:resnet18s")


def test_torchvision_weights_offline_give_one_line_error(tmp_path, monkeypatch):
    import urllib.error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

    class OfflineWeights:
        def get_state_dict(self, progress=True):
            raise urllib.error.URLError("[Errno 101] Network is unreachable")

    OfflineWeights.url = url

    class FakeEnum:
        DEFAULT = OfflineWeights()

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: FakeEnum)
    with pytest.raises(ValueError) as error:
        build_model(5, "resnet18", pretrained="torchvision")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--pretrained torchvision: could not")
    assert url in message and "Network is unreachable" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_train_reports_an_offline_hub_download_as_one_error_line(tmp_path, monkeypatch, capsys):
    import urllib.error
    import train
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, path):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(model_module, "_download", no_network)
    code = train.main(["--out", str(tmp_path / "run"), "--backbone", "resnet50", "--width", "1",
                       "--pretrained", "hub:resnet50s", "--iters", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --pretrained hub:resnet50s: could not download https://")

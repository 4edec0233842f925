"""The classifier architectures the studies share, behind one small interface.

Every network takes (B, C, S, S) images in [-1, 1] (ImageNet-pretrained ones normalise inside), returns logits
from forward() and its penultimate features from features(). A checkpoint stores {"arch": build kwargs,
"model": state_dict, ...}, so any script (the FD metric, the memorization audit, the DPO judge) rebuilds it
from the file alone.

    cnn8         plain 8-conv CNN (4 stages of 2 conv-BN-ReLU, 32-256 channels): the quick-scale chest X-ray net
    densenet121  torchvision DenseNet-121 (CheXNet), new linear head; ImageNet weights by flag
    resnet18_28  ResNet-18 for 28x28 (MedMNIST v2): 3x3 stride-1 stem, no max-pool
    resnet50     torchvision ResNet-50, new linear head; ImageNet weights by flag
    vit          a small Vision Transformer written here (patch 4, width 128, depth 4, 4 heads)
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """[-1, 1] grey or RGB -> ImageNet-normalised RGB, the input pretrained torchvision weights expect."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class CNN8(nn.Module):
    def __init__(self, in_ch, n_out, width=32, dropout=0.3):
        super().__init__()
        layers, c = [], in_ch
        for i, w in enumerate([width, width * 2, width * 4, width * 8]):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(c, n_out)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)  # (B, 8*width)

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


def _imagenet_weights(name, pretrained, weights_file):
    """torchvision weight enum (downloaded once on a user's machine), a local file, or None."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise DataError(f"weights file not found: {weights_file}")
        return torch.load(weights_file, map_location="cpu", weights_only=True)
    if not pretrained:
        return None
    import torchvision.models as tvm
    enum = {"densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1, "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
            "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1}[name]
    try:
        return enum.get_state_dict(progress=True)
    except Exception as e:
        raise DataError(f"cannot fetch {name} ImageNet weights ({type(e).__name__}). Offline? Use --no-pretrained, "
                        f"or --weights-file with the .pth from {enum.url}") from e


class TorchvisionNet(nn.Module):
    """DenseNet-121 / ResNet-50 trunk + a new linear head; ImageNet weights optional."""

    def __init__(self, name, n_out, pretrained=False, weights_file=None):
        super().__init__()
        import torchvision.models as tvm
        net = getattr(tvm, name)(weights=None)
        sd = _imagenet_weights(name, pretrained, weights_file)
        if sd is not None:
            net.load_state_dict(sd)
        self.inp = ImageNetInput()
        if name == "densenet121":
            self.trunk, dim = nn.Sequential(net.features, nn.ReLU(inplace=True)), net.classifier.in_features
        else:
            self.trunk, dim = nn.Sequential(*list(net.children())[:-2]), net.fc.in_features
        self.head = nn.Linear(dim, n_out)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.trunk(self.inp(x)), 1).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


class SubsampledPointwise(nn.Conv2d):
    """A 1x1 convolution of stride s, computed as every s-th pixel through a 1x1 convolution of stride 1: the same
    function, parameters and state-dict keys. On a CPU, oneDNN's weight gradient of a strided 1x1 convolution in
    channels_last writes past its buffer when the input has fewer channels than its block (8 or 16): heap corruption
    (seen with torch 2.14.1 at odd batch sizes) or wrong gradients; reported as uxlfoundation/oneDNN issue 6035."""

    def forward(self, x):
        return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight, self.bias)


ONEDNN_BLOCK = 16  # input channels below which a strided 1x1 convolution takes SubsampledPointwise


class ResNet18For28(nn.Module):
    """MedMNIST v2's ResNet-18 for 28x28: torchvision's ResNet-18 with conv1 3x3 stride 1 and no max-pool.
    width 64 is ResNet-18 itself (11.2 M parameters); a smaller width scales every stage (64-128-256-512 ->
    w-2w-4w-8w) for CPU quick runs, and the outputs name the width."""

    def __init__(self, in_ch, n_out, width=64):
        super().__init__()
        import torchvision.models as tvm
        if width == 64:
            net = tvm.resnet18(weights=None, num_classes=n_out)
        else:  # torchvision's ResNet builds its stages from self.inplanes; scale it and the stage widths
            net = tvm.ResNet(tvm.resnet.BasicBlock, [2, 2, 2, 2], num_classes=n_out)
            net.inplanes, net.bn1 = width, nn.BatchNorm2d(width)
            for i in range(4):
                setattr(net, f"layer{i + 1}", net._make_layer(tvm.resnet.BasicBlock, width * 2 ** i, 2,
                                                              stride=1 if i == 0 else 2))
            net.fc = nn.Linear(width * 8, n_out)
            for m in net.modules():  # torchvision's initialisation, which ran before the stages were replaced
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        net.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        for block in net.modules():  # the shortcut's 1x1 stride-2 convolution, at widths below the oneDNN block
            down = getattr(block, "downsample", None)
            if down is not None and down[0].in_channels < ONEDNN_BLOCK:
                conv = down[0]
                assert conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
                conv.__class__ = SubsampledPointwise  # the same module and weights (no new draw), another forward
        self.trunk = nn.Sequential(*list(net.children())[:-2])
        self.head = net.fc

    def features(self, x):
        return F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1)  # (B, 8 * width)

    def forward(self, x):
        return self.head(self.features(x))


EXPLICIT_ATTENTION_TOKENS = 64  # on a CPU, sequences up to this long take the explicit attention products


def encoder_layer(layer, x):
    """One pre-norm nn.TransformerEncoderLayer (batch_first, GELU) applied to x (B, N, dim) with its own parameters,
    written out: the same function as the module's training forward without its per-call checks. On a CPU, short
    sequences (17 tokens at quick scale) take attention as explicit products, faster there than the fused kernel the
    module calls (with fused AdamW, 1.28x the ViT's training steps per second: bench/machine_limit.py --loops
    vit,vit_module); long sequences and GPUs keep the fused kernel, whose memory grows with N, not N^2."""
    attn = layer.self_attn
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d / heads)
    p = attn.dropout if attn.training else 0.0
    if x.device.type == "cpu" and n <= EXPLICIT_ATTENTION_TOKENS:
        h = F.dropout(torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-2, -1), -1), p) @ v
    else:
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    # (B, N, dim) laid out as (N, B, dim), as the module's attention returns it: dropout1 draws its mask in that order
    x = x + layer.dropout1(attn.out_proj(h.permute(2, 0, 1, 3).reshape(n, b, d)).transpose(0, 1))
    return x + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(x))))))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021): patch embedding, [CLS] token, learned positions,
    pre-norm blocks; trains from scratch on small images. The blocks are nn.TransformerEncoderLayer's parameters
    (their initialisation and checkpoint names) run by encoder_layer."""

    def __init__(self, in_ch, n_out, size, patch=4, dim=128, depth=4, heads=4, mlp=256, dropout=0.1):
        super().__init__()
        self.embed = nn.Conv2d(in_ch, dim, patch, patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        assert self.blocks.norm is None and layer.norm_first and layer.self_attn.batch_first and \
            layer.self_attn._qkv_same_embed_dim and layer.self_attn.bias_k is None  # what encoder_layer assumes
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def features(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        for layer in self.blocks.layers:
            t = encoder_layer(layer, t)
        return self.norm(t[:, 0])  # (B, dim): the [CLS] token

    def forward(self, x):
        return self.head(self.features(x))


def build(arch, in_ch, n_out, size, pretrained=False, weights_file=None, width=32, vit=None, dropout=None):
    """A network by name; the kwargs are what a checkpoint stores under 'arch'. vit: ViT keyword arguments (patch,
    dim, depth, heads, mlp, dropout), its defaults when None. dropout: cnn8's before the head, the ViT's in its
    blocks (None: the network's default, 0.3 and 0.1; the torchvision networks have none)."""
    if dropout is not None and arch not in ("cnn8", "vit"):
        raise ValueError(f"{arch} has no dropout to set")
    if arch == "cnn8":
        return CNN8(in_ch, n_out, width) if dropout is None else CNN8(in_ch, n_out, width, dropout)
    if arch in ("densenet121", "resnet50"):
        return TorchvisionNet(arch, n_out, pretrained, weights_file)
    if arch == "resnet18_28":
        return ResNet18For28(in_ch, n_out, width)
    if arch == "vit":
        return ViT(in_ch, n_out, size, **{**(vit or {}), **({} if dropout is None else {"dropout": dropout})})
    raise ValueError(f"unknown arch {arch!r}")


# the smallest input side each network takes: CNN8 and the 28 px ResNet-18 halve it 3 times, DenseNet-121 and
# ResNet-50 5 times; the ViT needs whole 4 px patches
MIN_SIZE = {"cnn8": 8, "resnet18_28": 8, "densenet121": 32, "resnet50": 32, "vit": 4}


def check_size(arch, size, flag="--size"):
    """Refuse, in one line, an input side `arch` cannot take (before anything is trained)."""
    low = MIN_SIZE.get(arch, 1)
    if size < low or (arch == "vit" and size % 4):
        raise DataError(f"{flag} {size}: {arch} takes images of at least {low} px"
                        + (" in whole 4 px patches (a multiple of 4)" if arch == "vit" else "")
                        + " (a larger --size; images are resized to it)")


def arch_spec(arch, in_ch, n_out, size, width=32, dropout=None):
    """The build() kwargs a checkpoint stores (pretrained weights are in the state dict, not re-fetched); the input
    side is checked first."""
    check_size(arch, size)
    return {"arch": arch, "in_ch": in_ch, "n_out": n_out, "size": size, "width": width,
            **({} if dropout is None else {"dropout": dropout})}


def load_classifier(ckpt_path, map_location="cpu"):
    from common.runs import load_checkpoint, load_weights
    ck = load_checkpoint(ckpt_path, map_location)
    if not isinstance(ck, dict) or not isinstance(ck.get("arch"), dict) or "model" not in ck:
        raise DataError(f"{ckpt_path}: not a fairsynth classifier checkpoint (train_classifier.py writes them)")
    try:
        net = build(**ck["arch"])
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"{ckpt_path}: its 'arch' entry does not describe a network of classify/nets.py ({e})") from e
    return load_weights(net, ck["model"], ckpt_path).eval(), ck


class FeatureExtractor(nn.Module):
    """[0, 1] (B, 3, H, W) -> a classifier's penultimate features, resized and channel-matched to its input."""

    def __init__(self, net, in_ch, size):
        super().__init__()
        self.net, self.in_ch, self.size = net, in_ch, size

    def forward(self, x):
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.in_ch == 1:
            x = x.mean(1, keepdim=True)
        return self.net.features(x * 2 - 1)


def load_feature_extractor(ckpt_path):
    """(feature net, label 'FD-<arch>') for the FD metric and the memorization audit."""
    net, ck = load_classifier(ckpt_path)
    a = ck["arch"]
    return FeatureExtractor(net, a["in_ch"], a["size"]).eval(), f"FD-{a['arch']} ({Path(ckpt_path).parent.name})"

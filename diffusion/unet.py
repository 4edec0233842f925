"""A class-conditional U-Net for DDPM (Ho et al. 2020; Dhariwal & Nichol 2021), plain PyTorch.

Residual blocks (GroupNorm + SiLU, the timestep + class embedding added between the two convs), self-attention
at the resolutions in `attn_res`, strided-conv downsampling, nearest + conv upsampling, skip connections by
concatenation. The class embedding has one extra row, index `num_classes`, the null class for classifier-free
guidance. The output conv starts at zero, so an untrained model predicts eps = 0.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(ch):
    """GroupNorm with min(32, ch / 4) groups; where that does not divide ch (--width 6, or 240 channels where a skip
    joins at --width 40 --mults 1,2,4), its largest common divisor with ch, so that any width builds. Widths that
    built before get the same groups."""
    return nn.GroupNorm(math.gcd(ch, min(32, max(1, ch // 4))), ch)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim) (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: a zero column, as guided-diffusion


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.drop = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads = math.gcd(ch, heads)  # fewer heads when ch is not a multiple of `heads`
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        """The 1x1 convs run as linear maps on (B, HW, C): in channels_last that view is free, so no transposes."""
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        qkv = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias)  # channel = part * C + head * C/heads + j
        q, k, v = qkv.view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, HW, heads * C/heads)
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class UNet(nn.Module):
    def __init__(self, in_ch=1, size=32, base=64, mults=(1, 2, 2), num_res=2, attn_res=(16,), num_classes=0,
                 dropout=0.0, heads=4):
        super().__init__()
        self.num_classes, emb_dim = num_classes, base * 4
        self.time = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # row num_classes = null
        self.inp = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down, chans, ch, res = nn.ModuleList(), [base], base, size
        for i, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(nn.ModuleList([ResBlock(ch, base * m, emb_dim, dropout)] +
                                               ([Attention(base * m, heads)] if res in attn_res else [])))
                ch = base * m
                chans.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch, heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + chans.pop(), base * m, emb_dim, dropout)] +
                                             ([Attention(base * m, heads)] if res in attn_res else [])))
                ch = base * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.base = base

    def forward(self, x, t, y=None):
        """x (B, C, H, W), t (B,) integer steps, y (B,) class indices (num_classes = null) -> eps (B, C, H, W)."""
        emb = self.time(timestep_embedding(t, self.base))
        if self.label is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            emb = emb + self.label(y)
        h = self.inp(x)
        skips = [h]
        for blocks in self.down:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](h, emb)
                for b in blocks[1:]:
                    h = b(h)
            else:
                h = blocks[0](h)  # downsample
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](torch.cat([h, skips.pop()], 1), emb)
                for b in blocks[1:]:
                    h = b(h)
            else:
                h = blocks[1](blocks[0](h))  # upsample
        return self.out(h)


def shape_problems(a):
    """Why a U-Net of these args (a dict, as unet_from_args takes) cannot work as asked, one message per problem,
    each naming the flag to change; [] when it can. Each level halves the side exactly (the skip connections need
    the sides to match on the way up), and --attn-res names sides that a level has."""
    problems, levels = [], len(a["mults"])
    if a["size"] % 2 ** (levels - 1):
        problems.append(f"--size {a['size']}: must be divisible by {2 ** (levels - 1)} to halve {levels - 1} times "
                        f"(--mults has {levels} levels)")
        return problems
    sides = [a["size"] // 2 ** i for i in range(levels)]
    missing = [r for r in a["attn_res"] if r not in sides]
    if missing:
        problems.append(f"--attn-res {','.join(map(str, a['attn_res']))}: {','.join(map(str, missing))} is not the "
                        f"side of a level; the levels are {','.join(map(str, sides))} px")
    return problems


def unet_from_args(a):
    """Rebuild the U-Net from a checkpoint's stored args (a dict)."""
    return UNet(in_ch=a["channels"], size=a["size"], base=a["width"], mults=tuple(a["mults"]),
                num_res=a["num_res"], attn_res=tuple(a["attn_res"]), num_classes=a["num_classes"],
                dropout=a.get("dropout", 0.0))

"""The PyTorch twin of nucjax.models.unet.UNet (same layers, widths and parameters), for benchmarks only."""

import numpy as np
import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by the normalisation and ReLU (as nucjax's ConvBlock)."""

    def __init__(self, cin: int, cout: int, norm: str, groups: int):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
            if norm == "group":
                layers.append(nn.GroupNorm(groups, cout, eps=1e-5))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class TorchUNet(nn.Module):
    """U-Net with 2×2 stride-2 transposed-conv up-sampling (= nucjax "dense" and "transpose"): x [B, 3, H, W]."""

    def __init__(self, base_width: int = 32, depth: int = 4, norm: str = "group", groups: int = 8,
                 dropout: float = 0.0, out_channels: int = 1):
        super().__init__()
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(ConvBlock(cin, cout, norm, groups) for cin, cout in zip([3] + widths[:-2], widths))
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.bottom = ConvBlock(widths[-2], widths[-1], norm, groups)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth))
        self.up_blocks = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], norm, groups) for i in range(depth))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(self.dropout(x))
        for level in reversed(range(len(self.up))):
            x = self.up_blocks[level](torch.cat([skips[level], self.up[level](x)], dim=1))
        return self.head(x)


def load_flax_params(model: TorchUNet, params: dict) -> None:
    """Copy the parameters of a nucjax UNet(upsample="dense" or "transpose", norm="group" or "none") into `model`."""

    def conv(module: nn.Module, p: dict) -> None:
        module.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        if "bias" in p:
            module.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    def block(seq: ConvBlock, p: dict) -> None:
        convs = [m for m in seq if isinstance(m, nn.Conv2d)]
        norms = [m for m in seq if isinstance(m, nn.GroupNorm)]
        for i, c in enumerate(convs):
            conv(c, p[f"Conv_{i}"])
        for i, n in enumerate(norms):
            n.weight.data = torch.from_numpy(np.asarray(p[f"GroupNorm_{i}"]["scale"]).copy())
            n.bias.data = torch.from_numpy(np.asarray(p[f"GroupNorm_{i}"]["bias"]).copy())

    depth = len(model.down)
    for i in range(depth):
        block(model.down[i], params[f"ConvBlock_{i}"])
    block(model.bottom, params[f"ConvBlock_{depth}"])
    for j, level in enumerate(reversed(range(depth))):
        block(model.up_blocks[level], params[f"ConvBlock_{depth + 1 + j}"])
        up = params[f"Upsample_{j}"]
        if "Dense_0" in up:  # Dense [cin, 4·c], channel (a·2 + b)·c + k -> pixel (2i + a, 2j + b): [cin, a, b, c]
            kernel = np.asarray(up["Dense_0"]["kernel"])
            kernel = kernel.reshape(kernel.shape[0], 2, 2, -1)
        else:  # flax ConvTranspose (transpose_kernel=False) puts kernel[1 - a, 1 - b] at pixel (2i + a, 2j + b)
            kernel = np.asarray(up["ConvTranspose_0"]["kernel"])[::-1, ::-1].transpose(2, 0, 1, 3)
        # torch's ConvTranspose2d weight [cin, c, a, b] puts weight[..., a, b] at pixel (2i + a, 2j + b).
        model.up[level].weight.data = torch.from_numpy(kernel.transpose(0, 3, 1, 2).copy())
        bias = up["bias"] if "bias" in up else up["ConvTranspose_0"]["bias"]
        model.up[level].bias.data = torch.from_numpy(np.asarray(bias).copy())
    conv(model.head, params["Conv_0"])

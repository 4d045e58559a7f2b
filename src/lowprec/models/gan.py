"""A small DCGAN (Radford et al. 2016) for the CPU-sized GAN experiments of MPT (spec 1(b): DCGAN, no loss
scaling) and Park et al. (Section 4.4: DCGAN/BEGAN, INT8 weights, lazy update).

Both papers train at 64x64 or 128x128 (MPT: generator of 7 fractionally-strided convs, discriminator of 6 convs
and 2 FC); this one is sized for 28x28 (MNIST) or 32x32 images on 2 CPU cores.

Generator as DCGAN's: a projection of the noise (``nn.Linear`` + reshape to ``4*ngf x s x s``, s = size/4),
then two fractionally-strided convolutions (``nn.ConvTranspose2d``, kernel 4, stride 2, padding 1: s -> 2s ->
4s), the last one writing the image channels, with batch norm and ReLU between and tanh at the output. The
discriminator: two strided 4x4 convolutions with LeakyReLU(0.2) and a linear real/fake logit. Batch norm
everywhere except the generator's output and the discriminator's input; weights ~ N(0, 0.02), batch-norm
scales ~ N(1, 0.02), as in DCGAN. ``lowprec.convert`` emulates every op, transposed convolutions included
(``lowprec.nn.emulate``): under a policy their input, weight, output and both gradients are rounded as a
convolution's are (``lp.plan`` lists them).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DCGAN", "Discriminator", "Generator"]


class Generator(nn.Module):
    """(N, nz) noise -> (N, channels, image_size, image_size) images in [-1, 1]."""

    def __init__(self, nz: int, ngf: int, channels: int, image_size: int) -> None:
        super().__init__()
        side = image_size // 4
        self.project = nn.Sequential(
            nn.Linear(nz, 4 * ngf * side * side, bias=False),
            nn.Unflatten(1, (-1, side, side)),  # -1: stays valid under lowprec.widen
            nn.BatchNorm2d(4 * ngf),
            nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 4, 2, 1, bias=False),  # s -> 2s
            nn.BatchNorm2d(2 * ngf),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * ngf, channels, 4, 2, 1),  # 2s -> 4s
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z))


class Discriminator(nn.Module):
    """(N, channels, image_size, image_size) images -> (N,) real/fake logits (use BCE-with-logits)."""

    def __init__(self, ndf: int, channels: int, image_size: int) -> None:
        super().__init__()
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * ndf * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)).squeeze(1)


class DCGAN(nn.Module):
    """Container of ``.generator`` and ``.discriminator`` (train them with separate optimizers).

    Calling the container samples images: ``DCGAN(...)(z)`` is ``generator(z)``. Convert the two networks
    separately when a policy names first/last layers (``@first``/``@last``): the container's module order
    runs from the generator's first layer to the discriminator's last.
    """

    def __init__(self, nz: int = 64, ngf: int = 32, ndf: int = 32, channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4 or image_size < 8:
            raise ValueError(f"image_size must be a multiple of 4 and at least 8 (28 or 32), got {image_size}")
        self.nz = nz
        self.generator = Generator(nz, ngf, channels, image_size)
        self.discriminator = Discriminator(ndf, channels, image_size)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, nz) noise -> generated images."""
        return self.generator(z)

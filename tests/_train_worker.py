"""Tiny model and data for the training tests, and a script that trains them (for kill tests).

``python tests/_train_worker.py --ckpt-dir D --out F [--sleep S]`` trains ``TinySeg`` with
checkpoints in D and saves the final state dict to F; the kill-and-resume test SIGKILLs it.
The data augment with the global torch RNG and the model has dropout, so an exact resume needs
the data order, the augmentation stream and the dropout stream restored.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 3
SIZE = (8, 16)


class TinySeg(nn.Module):
    """encoder (conv) + decoder (dropout, 1x1 conv): logits [B, C, H, W]."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 4, dropout: float = 0.2):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class ToyDicts(Dataset):
    """n images whose label is the brightest channel; random flips/noise from the torch RNG."""

    def __init__(self, n: int = 10, size: tuple[int, int] = SIZE, augment: bool = True,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, *size, generator=g)
        self.masks = self.images.argmax(1) % NUM_CLASSES
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.images[i].clone(), self.masks[i].clone()
        if self.augment:
            if torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
            image = image + 0.01 * torch.randn_like(image)
        return {"image": image, "mask": mask, "index": i}


def ce_loss(outputs: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy, reported as a term too."""
    ce = F.cross_entropy(outputs, batch["mask"], ignore_index=255)
    return ce, {"ce": ce.detach()}


def make_loader(n: int = 10, batch_size: int = 3, num_workers: int = 0, **kw) -> DataLoader:
    return DataLoader(ToyDicts(n), batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      **kw)


def main() -> None:
    from minikd.training import fit

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(123)  # the init; fit's seed then fixes data order, augmentation, dropout
    model = TinySeg()

    def loss_fn(outputs: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        time.sleep(args.sleep)
        return ce_loss(outputs, batch)

    fit(model, make_loader(), loss_fn, iterations=args.iterations, lr=0.05, seed=7,
        ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every, progress=False, device="cpu")
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()

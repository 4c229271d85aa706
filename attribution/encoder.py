"""An in-domain image encoder: a small CNN classifier trained on the training set's labels. Its penultimate
features stand in for CLIP embeddings (counterfactual similarity) and its class posteriors for Inception ones
(quality metrics) when no such weights exist locally, which is always the case offline."""
from __future__ import annotations

import numpy as np

from .runtime import stable_seed


def build_classifier(channels: int, size: int, n_classes: int, width: int = 32, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(stable_seed("classifier", seed))
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2 if size >= 16 else 1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 4 * width), nn.GELU(),   # embedding = output of this block
        nn.Linear(4 * width, n_classes),
    )


def classifier_config(images: np.ndarray, n_classes: int, seed: int = 0) -> dict:
    return {"channels": int(images.shape[1]), "size": int(images.shape[2]), "n_classes": int(n_classes), "seed": seed}


def train_classifier(images: np.ndarray, labels: np.ndarray, n_classes: int, *, steps: int = 400,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0):
    """-> (model, training accuracy). Light augmentation (random shifts) keeps it from memorising."""
    import torch

    model = build_classifier(**classifier_config(images, n_classes, seed))
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(stable_seed("classifier-data", seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, float((predict_proba(model, images).argmax(1) == np.asarray(labels)).mean())


def _forward(model, images: np.ndarray, upto: int | None):
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        layers = list(model)[:upto] if upto is not None else list(model)
        for layer in layers:
            x = layer(x)
    return x.numpy().astype(np.float64)


def embed(model, images: np.ndarray) -> np.ndarray:
    """(m, d) penultimate features."""
    return _forward(model, images, upto=-1)


def predict_proba(model, images: np.ndarray) -> np.ndarray:
    logits = _forward(model, images, upto=None)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


class ImageModel:
    """A user's own image model (e.g. a TorchScript export of Inception, loaded from a local file) that maps images
    in [-1, 1] to (features, logits): the global properties then use it instead of the in-domain classifier."""

    def __init__(self, module, batch_size: int = 64):
        self.module, self.batch_size = module.eval(), batch_size

    def _outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        feats, logits = [], []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                out = self.module(torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size], np.float32)))
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise ValueError("the image model must return a (features, logits) pair for a batch of images")
                feats.append(out[0].reshape(len(out[0]), -1).double().numpy())
                logits.append(out[1].double().numpy())
        return np.concatenate(feats), np.concatenate(logits)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self._outputs(images)[0]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        logits = self._outputs(images)[1]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

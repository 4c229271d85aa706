"""The one way assets build, train, store, load, sample and prune this experiment's models, whatever the family:
a pixel-space DDPM UNet trained from scratch, or (the `lora` section) a LoRA adapter on a conditional base model.

In the LoRA family "training a model on some images" means fitting a fresh adapter (seeded) on the stored base,
conditioned on each image's class label; fine-tuning and sFT start from a stored adapter; pruning removes LoRA
ranks instead of channels. Every asset goes through ModelKit, so subset, counterfactual and coalition models follow
the family without knowing it.
"""
from __future__ import annotations

import numpy as np

from attribution.experiment import Experiment

CONDITIONING = "conditioning"


def explained_model(exp: Experiment) -> str:
    """The model every attribution method explains (its asset and model name)."""
    return "lora_model" if exp.lora.enabled else "base_model"


def query_inputs(queries: dict) -> np.ndarray:
    """What the model sees of the query set: its latents for a Stable Diffusion base, else its images."""
    return queries["inputs"] if "inputs" in queries else queries["images"]


def training_inputs(exp: Experiment) -> list[str]:
    """The assets an asset that trains models reads: the training set, and the base model of a LoRA family."""
    return ["training_set", "base_model"] if exp.lora.enabled else ["training_set"]


def generation_labels(exp: Experiment, train_labels, n: int) -> np.ndarray:
    """Class labels of n generated images: the training set's classes in turn (all zeros for unconditional
    models, which ignore them)."""
    if not exp.lora.enabled:
        return np.zeros(n, dtype=np.int64)
    classes = np.unique(np.asarray(train_labels))
    return classes[np.arange(n) % len(classes)].astype(np.int64)


class ModelKit:
    def __init__(self, exp: Experiment, paths, device: str = "cpu"):
        self.exp, self.paths, self.device = exp, paths, device
        self.lora = exp.lora.enabled
        self.latent = self.lora and exp.lora.base_pipeline is not None  # models live in a Stable Diffusion VAE's space
        self._table = self._vae = self._scheduler = None

    # ------------------------------------------------------------------------------------------ model space
    def vae(self):
        if self._vae is None:
            from attribution.lora import load_vae

            self._vae = load_vae(self.exp.lora.base_pipeline)
        return self._vae

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images -> model inputs: VAE latents (distribution means) for a Stable Diffusion base, else the images."""
        if not self.latent:
            return images
        from attribution.lora import encode_images_to_latents

        return encode_images_to_latents(self.vae(), images)

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Model outputs -> images in [-1, 1] (pictures, image metrics)."""
        if not self.latent:
            return x
        from attribution.lora import decode_latents

        return decode_latents(self.vae(), x)

    def inputs(self, split: str, data) -> np.ndarray:
        """The model inputs of a stored split (`data` is its ImageDataset): the latents training_set cached for a
        Stable Diffusion base, else the images."""
        if not self.latent:
            return data.images
        from storage.artefacts import load_arrays

        return load_arrays(self.paths.dataset(f"{split}_latents"), f"{split} latents (materialize training_set)")[0][
            "latents"]

    def input_shape(self, image_shape) -> tuple:
        if not self.latent:
            return tuple(image_shape)
        vae = self.vae()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return (int(vae.config.latent_channels), image_shape[1] // f, image_shape[2] // f)

    # ------------------------------------------------------------------------------------------ conditioning
    def conditioning(self, labels) -> np.ndarray | None:
        """(n, tokens, dim) encoder_hidden_states for class labels; None for an unconditional model."""
        if not self.lora:
            return None
        if self._table is None:
            from storage.artefacts import load_arrays

            self._table = load_arrays(self.paths.dataset(CONDITIONING),
                                      "label conditioning (materialize base_model)")[0]["table"]
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self._table)):
            raise ValueError(f"class labels {labels.min()}..{labels.max()} outside the {len(self._table)} "
                             "conditioned classes")
        return self._table[labels]

    # ------------------------------------------------------------------------------------------ models
    def scheduler(self):
        """The noise schedule models are trained and sampled with (a Stable Diffusion base's own)."""
        if self._scheduler is None:
            if self.latent:
                self._scheduler = self.stored("base_model").load_scheduler()
            else:
                from attribution.models import build_scheduler

                self._scheduler = build_scheduler(self.exp.model)
        return self._scheduler

    def initial(self, shape, seed: int):
        """The model before training with `seed`: the seed's fresh weights, or the base with the seed's fresh
        adapter (lora_B = 0: the base's outputs exactly)."""
        from attribution.runtime import stable_seed

        if not self.lora:
            from attribution.models import build_unet

            c, h, _ = shape
            return build_unet(self.exp.model, sample_size=h, channels=c, seed=stable_seed("init", seed))
        from attribution.lora import add_lora

        lo = self.exp.lora
        unet = self.load("base_model")
        add_lora(unet, lo.rank, lo.alpha, lo.target_modules, seed=stable_seed("lora", seed))
        return unet

    def train(self, images, labels, spec=None, *, seed: int | None = None, init=None, progress=None):
        """train_ddpm on images (with their labels' conditioning) from `init`, or from initial(seed)."""
        from attribution.training import train_ddpm

        spec = spec or self.exp.training
        seed = spec.seed if seed is None else seed
        if init is None and self.lora:
            init = self.initial(images.shape[1:], seed)
        scheduler_config = dict(self.scheduler().config) if self.latent else None
        return train_ddpm(np.asarray(images), self.exp.model, spec, seed=seed, device=self.device, init_model=init,
                          conditioning=self.conditioning(labels), scheduler_config=scheduler_config,
                          progress=progress)

    def train_many(self, image_sets, label_sets, seeds) -> list:
        """One model per (images, labels, seed) with the experiment's recipe: side by side in this process
        (attribution.batched_training) for plain UNets, else one after another."""
        if self.lora or len(image_sets) == 1:
            return [self.train(x, y, seed=s) for x, y, s in zip(image_sets, label_sets, seeds)]
        from attribution.batched_training import train_ddpm_many

        return train_ddpm_many([np.asarray(x) for x in image_sets], self.exp.model, self.exp.training, seeds,
                               device=self.device)

    def save(self, name: str, unet, *, pruned: bool = False, **kw) -> str:
        """Store a model (an adapter with its base reference in the LoRA family); -> its digest."""
        from storage.models import save_model

        base = self.paths.model("base_model") if self.lora else None
        return save_model(self.paths.model(name), unet, self.scheduler(), pruned=pruned and not self.lora,
                          base=base, **kw)

    def stored(self, name: str):
        from storage.models import StoredModel

        return StoredModel(self.paths.model(name))

    def load(self, name: str, checkpoint: int | None = None):
        return self.stored(name).load_unet(self.device, checkpoint=checkpoint)

    def prune(self, unet, ratio: float) -> dict:
        """sFT's pruning, in place: LoRA ranks by magnitude (keeping 1 - ratio), or channels by L2 magnitude;
        -> report with params_before / params_after."""
        if self.lora:
            from attribution.lora import prune_lora_ranks

            return prune_lora_ranks(unet, 1.0 - ratio).to_dict()
        from attribution.pruning import prune_unet

        return prune_unet(unet, ratio).to_dict()

    def sample(self, unet, seeds, labels, image_shape, steps: int, record_trajectory: bool = False):
        """DDIM samples in model space (latents for a Stable Diffusion base: decode() them for pictures)."""
        from attribution.sampling import ddim_sample

        return ddim_sample(unet, self.scheduler().config, seeds, self.input_shape(image_shape), steps=steps,
                           device=self.device, record_trajectory=record_trajectory,
                           encoder_hidden_states=self.conditioning(labels), clip=not self.latent)

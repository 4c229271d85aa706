"""A user-supplied global property (the aesthetics hook), loaded by 'module.path:function' from an experiment."""
import numpy as np


def brightness(images: np.ndarray, ctx) -> float:
    return float(np.asarray(images).mean())

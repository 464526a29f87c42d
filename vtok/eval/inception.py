"""Inception-v3 in the standard FID format (``pt_inception-2015-12-05``, the TF graph ported by
pytorch-fid and torch-fidelity), loaded from a local weights file without pickle.

torch-fidelity's ``FeatureExtractorInceptionV3`` supplies the network and the TF1-compatible resize
to 299x299. Its constructor either downloads the weights or reads them with
``torch.load`` with unpickling allowed; here it is built with the download hook returning nothing, and the
state dict, read safely (``weights_only=True`` / safetensors) and checked key by key, is loaded after.
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from torch import nn

from vtok.eval import EvalError
from vtok.models.weights import load_state_dict_strict, state_dict_mismatch

FEATURE_DIM = 2048  # pool3 features (FID)
NUM_CLASSES = 1008  # logits (Inception Score)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases"
WEIGHTS_HELP = f"expected the FID Inception-v3 weights {WEIGHTS_FILE} from {WEIGHTS_URL} (or as .safetensors)"


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (.pth / .pt via ``torch.load(weights_only=True)``, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} not found; {WEIGHTS_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a pickle that needs code, a format torch cannot read
        raise EvalError(f"cannot read Inception weights {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); {WEIGHTS_HELP}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"Inception weights {path} do not hold a state dict of tensors; {WEIGHTS_HELP}")
    return state


def _torch_fidelity_inception() -> nn.Module:
    """torch-fidelity's extractor (pool features + bias-free logits, as the IS reference code uses),
    randomly initialised: its constructor's weight loading is skipped, see the module docstring."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    class _Extractor(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # type: ignore[override]
            if state_dict is None:  # the constructor's own load: nothing to load
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *args, **kwargs: None):
        return _Extractor("inception-v3-compat", ["2048", "logits_unbiased"])


class InceptionFeatures(nn.Module):
    """Images -> FID pool features (B, 2048) and IS logits (B, 1008), both float32.

    Args:
        weights: the weights file (see ``read_inception_weights``); ``None`` keeps a random
            initialisation (tests only).
    """

    def __init__(self, weights: str | Path | None):
        super().__init__()
        self.net = _torch_fidelity_inception()
        if weights is not None:
            state = read_inception_weights(weights)
            problem = state_dict_mismatch(self.net, state)
            if problem:
                raise EvalError(f"Inception weights {weights} do not match the FID Inception-v3: {problem}; "
                                f"{WEIGHTS_HELP}")
            load_state_dict_strict(self.net, state, str(weights))  # old files lack BN counters: kept
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # always in eval mode (BatchNorm running statistics)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: (B, 3, H, W) uint8, or float in [-1, 1] (quantised to uint8 first, as a saved
        image would be). The network resizes to 299x299 itself (TF1-compatible bilinear).
        -> (features (B, 2048), logits (B, 1008))"""
        if images.dtype != torch.uint8:
            images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        device = next(self.net.parameters()).device
        features, logits = self.net(images.to(device))
        return features, logits

"""Quantizers. Every one returns the same ``QuantizerOutput`` and does its math in fp32."""
from vtok.models.quant.base import QuantizerOutput
from vtok.models.quant.factorized import FactorizedQuantizer
from vtok.models.quant.fsq import FSQ
from vtok.models.quant.vq import L2VectorQuantizer

__all__ = ["FSQ", "FactorizedQuantizer", "L2VectorQuantizer", "QuantizerOutput"]

"""Where users already train: a torch.amp-shaped API (``amp``), a Lightning/Fabric precision plugin
(``lightning``, needs ``pip install lowprec[lightning]``) and notes for Hugging Face models (docs/training.md).

``lowprec.integrations.lightning`` is imported on its own (it imports lightning); this package imports only
``amp``, whose ``autocast`` and ``GradScaler`` are also ``lowprec.autocast`` and ``lowprec.GradScaler``.
"""

from .amp import GradScaler, autocast, convert_in_place

__all__ = ["GradScaler", "autocast", "convert_in_place"]

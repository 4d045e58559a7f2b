"""Where users already train: a torch.amp-shaped API (``amp``), a Lightning/Fabric precision plugin
(``lightning``, needs ``pip install lowprec[lightning]``) and ``transformers.Trainer`` under any policy (``hf``, needs
``pip install lowprec[hf]``; Hugging Face models themselves need nothing: docs/training.md).

``lowprec.integrations.lightning`` and ``lowprec.integrations.hf`` are imported on their own (they import
lightning, transformers); this package imports only
``amp``, whose ``autocast`` and ``GradScaler`` are also ``lowprec.autocast`` and ``lowprec.GradScaler``.
"""

from .amp import GradScaler, autocast, convert_in_place

__all__ = ["GradScaler", "autocast", "convert_in_place"]

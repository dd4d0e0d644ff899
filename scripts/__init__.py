"""Python package of the LeViT-UNet MONAI bundle (imported by the bundle's configs)."""

import warnings

# torch >= 2.10 deprecates TorchScript, but the MONAI model zoo still exports bundles with
# ``torch.jit.script`` (``ckpt_export``); silence exactly that notice and nothing else.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

"""The text side: frozen text encoders, the variational text projector and the text decoder.

Captions -> ``TextEncoder.encode`` -> ``TextStates`` [B, 77, D] -> ``TextProjector`` -> text latent
z [B, 77, C] (the flow's t = 0 end). Image-to-text goes back with ``TextDecoder`` (z -> token logits).
"""

from .clip_tokenizer import ClipBPETokenizer
from .decoder import (
    DECODER_PRESETS,
    DecoderConfig,
    TextDecoder,
    normalize_caption,
    text_roundtrip_accuracy,
)
from .encoders import (
    CLIPTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    TextEncoderSpec,
    TextStateCache,
    TextStates,
    check_captions,
    load_text_encoder,
)
from .projector import (
    PROJECTOR_PRESETS,
    ProjectorConfig,
    ProjectorOutput,
    TextProjector,
    convert_upstream_state_dict,
    upstream_key,
)

__all__ = [
    "DECODER_PRESETS",
    "PROJECTOR_PRESETS",
    "CLIPTextEncoder",
    "ClipBPETokenizer",
    "DecoderConfig",
    "MiniLMTextEncoder",
    "ProjectorConfig",
    "ProjectorOutput",
    "TextDecoder",
    "TextEncoder",
    "TextEncoderSpec",
    "TextProjector",
    "TextStateCache",
    "TextStates",
    "check_captions",
    "convert_upstream_state_dict",
    "load_text_encoder",
    "normalize_caption",
    "text_roundtrip_accuracy",
    "upstream_key",
]

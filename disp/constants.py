"""Every special token, placeholder and fixed string the library relies on, named once.

Token ids are never written here: they are looked up by name in each checkpoint's tokenizer, so a
tiny checkpoint with a 600-token vocabulary and LLaDA-V's 126k vocabulary go through the same code.
"""

# Special tokens of the LLaDA tokenizer (LLaDA `tokenizer_config.json`).
MASK_TOKEN = "<|mdm_mask|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the padding token
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"

SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)

# Tokens a sampler never writes into a masked answer position (LLaDA-V `generate_with_embeds`).
SUPPRESSED_AT_MASK = (EOS_TOKEN, BOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN)

# The image placeholder in prompt text, and its id in a token list before visual embeddings are spliced
# in (LLaVA's IMAGE_TOKEN_INDEX).
IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200

# LLaDA-V's `llava_llada` conversation template system prompt.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# File formats that are refused unopened: they unpickle on load and can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PROJECTOR_PREFIX = "model.mm_projector."
IMAGE_NEWLINE_KEY = "model.image_newline"

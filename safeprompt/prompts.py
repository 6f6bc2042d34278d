"""The human safety prompts of the DRO paper (Zheng et al., ICML 2024), verbatim.

Texts from the authors' `code/utils.py` (DEFAULT is Llama-2's official system prompt; MISTRAL is the
repository's paraphrase of Mistral's guardrail prompt). These are the `default`, `short` and `mistral`
variants the gateway serves as text and the initialisations the trainer optimises from.
This module knows nothing about models or tokenizers.
"""

from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't share "
    "false information."
)

SHORT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."
)

MISTRAL_SYSTEM_PROMPT = (
    "You are an AI assistant. Always assist with care, respect, and truth. Please respond with utmost "
    "utility yet securely and avoid harmful, unethical, prejudiced, or negative content. Also ensure "
    "replies promote fairness and positivity."
)

# Name -> text. `none` (no system message at all, as in the paper) is not a text prompt and is
# therefore not listed here.
HUMAN_PROMPTS: dict[str, str] = {
    "default": DEFAULT_SYSTEM_PROMPT,
    "short": SHORT_SYSTEM_PROMPT,
    "mistral": MISTRAL_SYSTEM_PROMPT,
}

# The four prompt conditions of the paper's label/extract stages, in the paper's order.
PROMPT_CONDITIONS: tuple[str, ...] = ("none", "default", "short", "mistral")

# A served model id names its safety-prompt variant after this separator: `MODEL@VARIANT`.
VARIANT_SEPARATOR = "@"

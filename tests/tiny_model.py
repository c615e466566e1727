"""Old import path of the tiny test model; it lives in load_tests.tiny_model (installed with the package)."""
from load_tests.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model, build_tokenizer  # noqa: F401

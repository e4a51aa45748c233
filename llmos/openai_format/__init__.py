"""The OpenAI API's formats, neutral ground between the io driver and the kernel
(design.md rule 7): request parsing and validation, response shaping, the error shape."""
from llmos.openai_format.errors import ApiError, error_type
from llmos.openai_format.requests import ParsedRequest, parse_chat, parse_completion
from llmos.openai_format.responses import ResponseShaper

__all__ = ["ApiError", "ParsedRequest", "ResponseShaper", "error_type", "parse_chat", "parse_completion"]

"""Tokenizer and chat template, read from a checkpoint directory (local files only).

`tokenizer.json` is loaded with the `tokenizers` library; `tokenizer_config.json` supplies the Jinja chat
template and the BOS token name, as in LLaDA's published tokenizer. Special tokens are resolved by name
(`disp.constants`), so ids come from the checkpoint, never from this code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from disp.constants import (
    BOS_TOKEN,
    DEFAULT_SYSTEM_PROMPT,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    MASK_TOKEN,
    START_HEADER_TOKEN,
    SUPPRESSED_AT_MASK,
)

# LLaDA's chat template (tokenizer_config.json): BOS once, each message as a header block ended by
# <|eot_id|>, then the assistant header as the generation prompt.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed, or lacks a required special token."""


@dataclass(frozen=True)
class PromptTemplate:
    """The declared prompt format, shared by training, purification and evaluation.

    Args:
        system: system message; None or "" renders no system turn.
        image_first: put `<image>` on its own line before the question when the question has none.
    """

    system: str | None = DEFAULT_SYSTEM_PROMPT
    image_first: bool = True

    def user_text(self, question: str) -> str:
        if IMAGE_PLACEHOLDER in question:
            return question
        return f"{IMAGE_PLACEHOLDER}\n{question}" if self.image_first else f"{question}\n{IMAGE_PLACEHOLDER}"


class ChatTokenizer:
    """Text ↔ ids with the checkpoint's chat template and named special tokens."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str, bos_token: str = BOS_TOKEN,
                 template: PromptTemplate | None = None):
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self.bos_token = bos_token
        self._chat = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
        self.mask_id = self.token_id(MASK_TOKEN)
        self.bos_id = self.token_id(bos_token)
        self.eos_id = self.token_id(EOS_TOKEN)
        self.eot_id = self.token_id(EOT_TOKEN)
        self.start_header_id = self.token_id(START_HEADER_TOKEN)
        self.end_header_id = self.token_id(END_HEADER_TOKEN)
        self.suppressed_ids = tuple(self.token_id(t) for t in SUPPRESSED_AT_MASK)

    @classmethod
    def from_dir(cls, path: str | Path, template: PromptTemplate | None = None) -> ChatTokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (the checkpoint must ship its tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: cannot be read as a tokenizers file: {exc}") from exc
        cfg: dict = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{cfg_file}: invalid JSON: {exc}") from exc
        bos = cfg.get("bos_token", BOS_TOKEN)
        if isinstance(bos, dict):
            bos = bos.get("content", BOS_TOKEN)
        return cls(tokenizer, chat_template=cfg.get("chat_template") or LLADA_CHAT_TEMPLATE, bos_token=bos,
                   template=template)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids; special tokens written in the text are recognised, none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_prompt(self, question: str, *, history: Sequence[tuple[str, str]] = (),
                      system: str | None = None) -> str:
        """The full prompt text: system turn, earlier (user, assistant) turns, the user turn, assistant header.

        The first user turn carries `<image>`; `system` replaces the template's system prompt ("" for none).
        """
        messages = []
        system = self.template.system if system is None else system
        if system:
            messages.append({"role": "system", "content": system})
        turns = [*history, (question, None)]
        for k, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": self.template.user_text(q) if k == 0 else q})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        return self._chat.render(messages=messages, bos_token=self.bos_token, add_generation_prompt=True)

    def encode_prompt(self, question: str, *, history: Sequence[tuple[str, str]] = (),
                      system: str | None = None) -> list[int]:
        """Prompt ids with one IMAGE_TOKEN_INDEX where the visual embeddings go (see `render_prompt`)."""
        text = self.render_prompt(question, history=history, system=system)
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) != 2:
            raise ValueError(f"a prompt must hold exactly one {IMAGE_PLACEHOLDER!r}, got {len(pieces) - 1}: {question!r}")
        return self.encode_text(pieces[0]) + [IMAGE_TOKEN_INDEX] + self.encode_text(pieces[1])

    def encode_dialogue(self, questions: Sequence[str], answers: Sequence[str], *,
                        system: str | None = None) -> tuple[list[int], list[int], list[bool]]:
        """A whole conversation for training: (prompt ids up to the first answer, the rest's ids, and per id of
        the rest whether it is a target). Targets are each answer and its <|eot_id|>; the user turns between
        answers are context. The rest is the chat template's own rendering of the later turns."""
        if len(questions) != len(answers) or not questions:
            raise ValueError(f"a dialogue needs one answer per question, got {len(questions)} and {len(answers)}")
        prompt = self.encode_prompt(questions[0], system=system)
        rest: list[int] = []
        targets: list[bool] = []
        before = self.render_prompt(questions[0], system=system)
        for k, answer in enumerate(answers):
            ids = self.encode_answer(answer)
            rest += ids
            targets += [True] * len(ids)
            if k + 1 == len(answers):
                break
            history = list(zip(questions[: k + 1], answers[: k + 1], strict=True))
            after = self.render_prompt(questions[k + 1], history=history, system=system)
            done = before + answer.strip() + EOT_TOKEN
            if not after.startswith(done):
                raise TokenizerError("the chat template does not render a conversation as its turns in order; "
                                     "multi-turn training needs one that does")
            ids = self.encode_text(after[len(done):])
            rest += ids
            targets += [False] * len(ids)
            before = after
        return prompt, rest, targets

    def encode_answer(self, answer: str) -> list[int]:
        """Answer ids ending with <|eot_id|>, as the assistant turn is trained."""
        return self.encode_text(answer.strip()) + [self.eot_id]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

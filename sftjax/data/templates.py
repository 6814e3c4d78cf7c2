"""Built-in chat templates and the choice between them and the model's own (`data.chat_template`).

A base model usually ships no chat template, and an instruct model's may not be the format you want
to teach, so a few well-known formats are built in. They are ordinary HF chat templates (jinja over
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), set on the tokenizer, so rendering,
generation and export all go through `tokenizer.apply_chat_template` like any model's own template.

Two properties the rest of the data pipeline relies on, and the tests check for every built-in:
- every assistant turn ends with an end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, or the
  tokenizer's EOS for alpaca), inside the reply's loss span, so the model learns to stop;
- rendering is append-only: the conversation up to a reply with `add_generation_prompt=True` is a
  string prefix of the conversation with that reply, which is a prefix of the whole conversation,
  so each reply is located by character offsets (see `sftjax.data.chat.assistant_spans`).
"""

from __future__ import annotations

import os

import jinja2

from sftjax.errors import UserError

# ChatML as OpenAI, Qwen and SmolLM write it: no BOS, content verbatim, a newline after each turn.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3: BOS once, a header per turn, content trimmed, `<|eot_id|>` closing every turn.
LLAMA3 = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Alpaca: a system message is a preamble paragraph, then "### Instruction:" / "### Response:" blocks.
# Blocks are separated by a blank line written *before* each one, so the text ends with the last
# reply's EOS rather than with whitespace the model would never be trained to produce.
ALPACA = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n\\n' }}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] | trim }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] | trim }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('the alpaca template has no place for role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n\\n' if messages else '' }}{{- '### Response:\\n' }}{%- endif %}"
)

BUILTIN: dict[str, str] = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}

_SAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def resolve(tokenizer, choice: str, model: str | None = None) -> None:
    """Set `tokenizer.chat_template` from `data.chat_template`, or check the model has one.

    Args:
        tokenizer: a HF tokenizer; changed in place.
        choice: "model" (keep the tokenizer's own template), a name in `BUILTIN`, or the path of
            a jinja file in the HF chat-template dialect.
        model: what error messages call the model (default: the tokenizer's `name_or_path`).

    Raises:
        UserError: naming `data.chat_template`, for a model without a template, an unknown name,
            a missing file, or a file that fails to render a one-exchange conversation.
    """
    if choice == "model":
        if not getattr(tokenizer, "chat_template", None):
            what = model or getattr(tokenizer, "name_or_path", "") or "the model"
            raise UserError(f"data.chat_template: the tokenizer of {what} has no chat template; set "
                            f"data.chat_template to one of {', '.join(BUILTIN)} or a .jinja file")
        return
    if choice in BUILTIN:
        template = BUILTIN[choice]
    elif os.path.isfile(choice):
        template = _read(choice)
    elif choice.endswith(".jinja") or os.sep in choice:
        raise UserError(f"data.chat_template: {choice}: file not found")
    else:
        raise UserError(f"data.chat_template: {choice!r} is not one of model, {', '.join(BUILTIN)} "
                        "or the path of a .jinja file")
    if "eos_token" in template and not tokenizer.eos_token:
        raise UserError(f"data.chat_template: {choice} ends each reply with the tokenizer's EOS token, "
                        "and this tokenizer has none; choose chatml or llama-3")
    try:  # a broken file fails here, naming its line, rather than on the first training record
        tokenizer.apply_chat_template(_SAMPLE, chat_template=template, tokenize=False)
    except jinja2.TemplateError as e:
        line = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        raise UserError(f"data.chat_template: {choice}{line}: the template fails on a simple "
                        f"user/assistant exchange: {e.message}") from None
    tokenizer.chat_template = template


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data.chat_template: {path}: not valid UTF-8 (byte {e.start})") from None
    if not template.strip():
        raise UserError(f"data.chat_template: {path}: the file is empty")
    return template

"""Built-in chat templates: exact renderings, the append-only prefix property, and `resolve` errors."""

import copy

import jinja2
import pytest

from sftjax.data.templates import BUILTIN, resolve
from sftjax.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
]

# SmolLM2's tokenizer: bos_token "<|im_start|>", eos_token "<|im_end|>".
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4.<|im_end|>\n",
    "llama-3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>",
    "alpaca": "<|im_start|>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|im_end|>\n\n"
              "### Instruction:\n2+2?\n\n### Response:\n4.<|im_end|>",
}
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "alpaca": "\n\n### Response:\n"}
END_OF_TURN = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "alpaca": "<|im_end|>"}


@pytest.fixture
def tok(smol_tokenizer):
    """The session tokenizer, with its own chat template put back afterwards."""
    original = smol_tokenizer.chat_template
    yield smol_tokenizer
    smol_tokenizer.chat_template = original


def render(tok, messages, add_generation_prompt=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", BUILTIN)
def test_exact_rendering(tok, name):
    resolve(tok, name)
    assert tok.chat_template == BUILTIN[name]
    assert render(tok, CHAT) == EXPECTED[name]
    assert render(tok, CHAT[:4], add_generation_prompt=True) == EXPECTED[name][: EXPECTED[name].rindex("4.")]
    assert render(tok, CHAT[:4], add_generation_prompt=True).endswith(GENERATION_PROMPT[name])


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("name", BUILTIN)
def test_rendering_is_append_only_and_every_reply_ends_its_turn(tok, name, system):
    """Prompt up to reply i ⊑ conversation through reply i ⊑ whole conversation, for every reply,
    and each reply is followed by the end-of-turn marker the model must learn to emit."""
    resolve(tok, name)
    chat = [{"role": "system", "content": "You are terse."}] if system else []
    for q, a in [("Capital of France?", "Paris."), (" Sure? ", "  Yes, Paris.\n"),
                 ("And of Italy?", "Rome.\n\nIt has been the capital since 1871.")]:
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    whole = render(tok, chat)
    replies = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    assert len(replies) == 3
    for i in replies:
        prompt = render(tok, chat[:i], add_generation_prompt=True)
        through = render(tok, chat[: i + 1])
        assert through.startswith(prompt) and whole.startswith(through)
        turn = through[len(prompt):].rstrip()
        assert turn.endswith(END_OF_TURN[name]) and chat[i]["content"].strip() in turn
        assert turn.count(END_OF_TURN[name]) == 1


def test_model_keeps_the_tokenizers_own_template(tok):
    own = tok.chat_template
    resolve(tok, "model")
    assert tok.chat_template == own and "<|im_start|>" in own


def test_model_without_a_template_names_the_model_and_the_choices(tok):
    tok.chat_template = None
    with pytest.raises(UserError, match=r"data\.chat_template: the tokenizer of models/base has no chat template; "
                                        r"set data\.chat_template to one of chatml, llama-3, alpaca or a \.jinja"):
        resolve(tok, "model", model="models/base")


def test_jinja_file(tok, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}")
    resolve(tok, str(path))
    assert render(tok, CHAT[1:3]) == "user: Hi<|im_end|>\nassistant: Hello!<|im_end|>\n"


def test_bad_choices_name_the_config_key(tok, tmp_path):
    own = tok.chat_template
    with pytest.raises(UserError, match=r"data\.chat_template: 'vicuna' is not one of model, chatml, llama-3, alpaca"):
        resolve(tok, "vicuna")
    missing = str(tmp_path / "nope.jinja")
    with pytest.raises(UserError, match=rf"data\.chat_template: {missing}: file not found"):
        resolve(tok, missing)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(UserError, match=rf"data\.chat_template: {broken}:2: the template fails"):
        resolve(tok, str(broken))
    assert tok.chat_template == own  # a failed choice leaves the tokenizer as it was


def test_alpaca_needs_an_eos_token_and_known_roles(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    resolve(tok, "alpaca")
    with pytest.raises(jinja2.TemplateError, match="no place for role tool"):
        render(tok, [{"role": "tool", "content": "42"}])
    tok.eos_token = None
    with pytest.raises(UserError, match=r"data\.chat_template: alpaca .* this tokenizer has none"):
        resolve(tok, "alpaca")
